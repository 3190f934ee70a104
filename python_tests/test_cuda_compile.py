"""Every .cu under csrc/ compiles with nvcc for sm_80 and sm_90 (compile only, no GPU needed),
with no register spills in the --resource-usage report."""
import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
NVCC = shutil.which("nvcc")


def test_cuda_sources_exist():
    assert SOURCES, "no .cu files under csrc/"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: os.path.relpath(p, ROOT))
def test_nvcc_compiles(src, arch, tmp_path):
    cmd = [NVCC, "-c", "-O3", "-std=c++17", "--use_fast_math", "--resource-usage",
           f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-I", os.path.join(ROOT, "csrc", "include"), src, "-o", str(tmp_path / "out.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "warning" not in report.lower(), report
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    assert spills, f"no resource-usage report:\n{report}"
    assert max(spills) == 0, f"register spills:\n{report}"
