"""The sdist carries every source and header the extension build needs (issue 21: it used to lack
csrc/include/*.h and csrc/cuda/*, so `pip install kdkernels-0.1.0.tar.gz` failed with
`kd_math.h: No such file or directory`). The full build-and-install-from-sdist check, in a fresh
virtual environment, is `.ci/sdist.sh` (a few minutes; CI runs it after the tests)."""
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tracked(*paths):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    out = subprocess.run(["git", "-C", ROOT, "ls-files", *paths], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"not a git checkout ({out.stderr.strip()})")
    return [f for f in out.stdout.splitlines() if f]


def test_sdist_carries_every_source_and_header(tmp_path):
    if not os.path.exists(os.path.join(ROOT, "setup.py")):
        pytest.skip("not a source tree")
    # A clean copy of the checkout (tracked and untracked-but-not-ignored files): an old
    # *.egg-info/SOURCES.txt in the working tree would otherwise carry files into the sdist.
    src = tmp_path / "src"
    files = _tracked("--cached", "--others", "--exclude-standard")
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(src / os.path.dirname(f), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), src / f)
    # setuptools' PEP 517 hook directly (what `python -m build --sdist --no-isolation` calls)
    code = ("import sys; from setuptools import build_meta; "
            "print(build_meta.build_sdist(sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=src,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    name = out.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    need = _tracked("csrc", "kdkernels", "docs") + ["README.md", "pyproject.toml", "setup.py"]
    missing = [f for f in need if f not in members]
    assert not missing, f"the sdist lacks {missing}"
    assert any(f.endswith(".h") for f in need) and any(f.endswith(".cu") for f in need)
    assert not [m for m in members if m.endswith((".so", ".o", ".pyc"))], "build outputs in the sdist"


def test_ci_sdist_script_is_there():
    path = os.path.join(ROOT, ".ci", "sdist.sh")
    if not os.path.exists(os.path.join(ROOT, ".ci")):
        pytest.skip("no .ci folder (installed package)")
    assert os.access(path, os.X_OK), ".ci/sdist.sh must be executable"
    text = open(path).read()
    for step in ("--sdist --wheel --no-isolation", "torch==2.13.0", "--no-build-isolation",
                 "-m kdkernels info", "-m kdkernels check --rows 8 --vocab 100"):
        assert step in text, step
