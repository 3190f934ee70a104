"""The guard: a CPU tensor never reaches a compiled Triton launch.

Without the interpreter (TRITON_INTERPRET unset, as on a GPU machine), the dense and sparse Triton
launchers and ``backends.choose`` refuse CPU tensors with a clear error instead of launching (which
would fail with "0 active drivers" here, or hand host pointers to a GPU kernel there). Run in a
subprocess: this process has the interpreter on (conftest). The collection-time half of the guard
is conftest.pytest_collection_modifyitems (checked here with a simulated GPU)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r'''
import os, torch
assert os.environ.get("TRITON_INTERPRET") != "1"
from kdkernels.backends.triton import launch, sparse_launch
from kdkernels import backends
import kdkernels as kd
s = torch.randn(1, 4, 32); t = torch.randn(1, 4, 32)
refused = []
def expect(name, f):
    try:
        f()
    except RuntimeError as e:
        assert "interpreter" in str(e), e
        refused.append(name)
    else:
        raise SystemExit(f"{name}: a CPU tensor reached a compiled Triton launch")
expect("forward_rows", lambda: launch.forward_rows(s, t, None, 0, 0.0, 1.0, 1.0, 0.0, -100))
stats = torch.zeros(4, 7)
expect("backward_rows", lambda: launch.backward_rows(torch.ones(4), s, t, None, stats, 0, 0.0,
                                                     1.0, 1.0, 0.0, -100))
idx = torch.zeros(4, 2, dtype=torch.int64)
expect("sparse_stats", lambda: sparse_launch.sparse_stats(s, idx, None, 1.0, True, False))
z = torch.zeros(4)
expect("sparse_grad", lambda: sparse_launch.sparse_grad(s, torch.zeros(4, 3), idx, None, 1.0,
                                                        True, False, z, z, torch.zeros(4, 2), z))
expect("choose", lambda: backends.choose("triton", torch.device("cpu"), torch.float32))
expect("kd_loss", lambda: kd.kd_loss(s, t, backend="triton") if backends.availability("triton")
       is None else (_ for _ in ()).throw(RuntimeError("interpreter: unavailable")))
print("refused", " ".join(refused))
'''


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_cpu_tensors_never_reach_a_compiled_triton_launch():
    r = subprocess.run([sys.executable, "-c", _CHILD], env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "refused forward_rows backward_rows sparse_stats sparse_grad choose kd_loss" in r.stdout


def test_collection_guard_rejects_a_module_keeping_triton_tensors_on_cpu(tmp_path):
    """With a (simulated) GPU, collecting a test module that parametrizes backend="triton" but
    never takes its device from conftest.device_for is an error."""
    shutil.copy(os.path.join(ROOT, "python_tests", "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_bad.py").write_text(
        "import pytest, torch, kdkernels as kd\n"
        "@pytest.mark.parametrize('backend', ['triton'])\n"
        "def test_x(backend):\n"
        "    kd.kd_loss(torch.randn(2, 8), torch.randn(2, 8), backend=backend)\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "--collect-only", str(tmp_path)], cwd=tmp_path, capture_output=True,
                       text=True, env=_env(KDKERNELS_SIMULATE_GPU="1", TRITON_INTERPRET="1"),
                       timeout=300)
    assert r.returncode != 0 and "never leave the CPU" in r.stdout + r.stderr, r.stdout + r.stderr
