"""Every Triton kernel compiles for sm_80 and sm_90 at its default launch configuration, for
every divergence id (logit_mse: its own two kernels), in fp32 and bf16, and ptxas reports no
spills (no GPU needed)."""
import pytest

from kdkernels.backends.triton import aot
from kdkernels.backends.triton.launch import DEFAULT_CONFIGS
from kdkernels.backends.triton.mse_launch import CONFIGS as MSE_CONFIGS


@pytest.fixture(scope="module")
def report():
    return aot.compile_report(aot.default_variants())


def test_every_variant_compiled(report):
    got = {(r["kernel"], r["div"], r["dtype"], r["cap"]) for r in report}
    want = {(k, d, dt, c) for k in ("fwd", "bwd", "given", "ens_fwd", "ens_bwd")
            for d in range(aot.N_DIVERGENCES) for dt in ("fp32", "bf16") for c in (80, 90)}
    want |= {("lse", 0, dt, c) for dt in ("fp32", "bf16") for c in (80, 90)}
    assert {("ens_bwd", d, "bf16", 90, 8) for d in range(aot.N_DIVERGENCES)} <= {
        (r["kernel"], r["div"], r["dtype"], r["cap"], r["m"]) for r in report}
    # logit_mse's own kernels (mse_kernels.py)
    want |= {(k, aot.LOGIT_MSE, dt, c) for k in aot.MSE_KERNELS for dt in ("fp32", "bf16")
             for c in (80, 90)}
    assert want <= got, f"missing: {sorted(want - got)}"
    for r in report:
        table = MSE_CONFIGS if r["kernel"] in aot.MSE_KERNELS else DEFAULT_CONFIGS
        assert (r["block"], r["num_warps"]) == table[divmod(r["cap"], 10)][r["kernel"]]
        assert 0 < r["registers"] <= 255


def test_no_spills(report):
    spilled = [r for r in report if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "ptxas spills:\n" + "\n".join(map(str, spilled))


def test_ptxas_report_parsing():
    text = ("ptxas info    : Function properties for k\n"
            "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
            "ptxas info    : Used 80 registers, used 1 barriers")
    assert aot._parse_ptxas(text) == {"registers": 80, "spill_stores": 4, "spill_loads": 12,
                                      "stack_frame": 8}
    with pytest.raises(RuntimeError):
        aot._parse_ptxas("nonsense")
