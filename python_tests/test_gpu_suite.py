"""benchmarks/gpu_suite.sh --dry-run: the GPU job's plumbing (paths, time budget, steps, file count
and names) proven on a CPU machine before a GPU is lent. CI runs the fast subset
(GPU_SUITE_FAST=1: one small test file, one vocabulary); the full dry run is
``bash benchmarks/gpu_suite.sh --dry-run OUTDIR`` (a few minutes)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_dry_run_fast(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHON=sys.executable, GPU_SUITE_FAST="1", SUITE_SECONDS="120")
    r = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_suite.sh"), "--dry-run",
                        str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    names = sorted(os.listdir(out))
    assert 0 < len(names) <= 8, names
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    assert all((out / n).is_file() for n in names), names
    for need in ("env.txt", "log.txt", "junit.xml", "results.csv", "divergences.csv", "table.txt"):
        assert need in names, (need, names)
    env_txt = (out / "env.txt").read_text()
    for step in ("tests", "sweep", "divergences"):
        assert re.search(rf"^  {step}: rc=0,", env_txt, re.M), env_txt
    assert "copy rate (cpu)" in env_txt and "build: skipped" in env_txt, env_txt
    csv = (out / "results.csv").read_text()
    assert "time_s" in csv and "bfloat16" in csv and "float32" in csv
    div = (out / "divergences.csv").read_text()
    for d in ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"):
        assert d in div, d
    assert 'failures="0"' in (out / "junit.xml").read_text()
