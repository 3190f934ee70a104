"""The benchmark harness: CLI on a tiny CPU sweep, CSV and PNG output, refusal of wrong results,
--impl filtering, option errors, the Liger adapter's math, and the CPU memory measurement."""
import csv
import functools
import math

import pytest
import torch

from kdkernels.tools import bench
from kdkernels.__main__ import main
from kdkernels import kd_loss
from kdkernels.tools.eager import eager_kd_loss
from conftest import BENCH_DEVICE


def _run(tmp_path, *argv):
    out = tmp_path / "out"
    rc = main(["bench", "--quiet", "--out", str(out), *argv])
    return rc, out


def _rows(out):
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.CSV_COLUMNS
        return list(reader)


def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    import matplotlib.image as mpimg
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200


def test_cli_tiny_sweep_writes_csv_png_and_table(tmp_path, capsys):
    rc, out = _run(tmp_path, "--N", "16", "--V", "64", "100", "--repeats", "2",
                   "--impl", "eager", "kd-reference", "--no-memory")
    assert rc == 0
    rows = _rows(out)
    times = [r for r in rows if r["metric"] == "time_s"]
    got = {(r["implementation"], int(r["N"]), int(r["V"])) for r in times}
    assert got == {(i, 16, v) for i in ("eager", "kd-reference") for v in (64, 100)}
    for r in times:
        med, p20, p80 = float(r["median"]), float(r["p20"]), float(r["p80"])
        assert 0 < p20 <= med <= p80
        assert r["device"] == BENCH_DEVICE and r["dtype"] == "float32" and r["divergence"] == "forward_kl"
        assert "torch=" in r["versions"] and r["date"] and r["card"]
    errs = [float(r["median"]) for r in rows if r["metric"] in ("loss_err", "grad_err")]
    assert len(errs) == 8 and max(errs) <= bench.TOLERANCE["float32"]
    _png_ok(out / "forward_kl_float32.png")
    assert (out / "table.txt").read_text().count("kd-reference") == 2
    printed = capsys.readouterr().out
    assert "speedup" in printed and "kd-reference" in printed


def test_compile_is_timed_with_its_first_call_apart(tmp_path):
    rc, out = _run(tmp_path, "--N", "16", "--V", "64", "--repeats", "2", "--impl", "eager",
                   "compile", "--no-memory", "--no-plots")
    assert rc == 0
    rows = {(r["implementation"], r["metric"]): r for r in _rows(out)}
    first = float(rows["compile", "first_call_s"]["median"])
    steady = float(rows["compile", "time_s"]["p80"])
    assert first > 5 * steady  # compilation is in the first call, not in the statistics
    assert float(rows["compile", "grad_err"]["median"]) <= bench.TOLERANCE["float32"]


def test_cpu_memory_in_fresh_subprocess(tmp_path):
    # one case with memory on: eager must at least allocate the gradient [N, V] fp32, and holds
    # several more [N, V] fp32 buffers (log-softmaxes and their gradients)
    N, V = 64, 4096
    rc, out = _run(tmp_path, "--N", str(N), "--V", str(V), "--repeats", "2", "--impl", "eager",
                   "--no-plots", "--device", "cpu")
    assert rc == 0
    mem = [r for r in _rows(out) if r["metric"] == "peak_extra_bytes"]
    assert len(mem) == 1 and mem[0]["median"], mem
    peak = int(mem[0]["median"])
    assert N * V * 4 <= peak < 64 * N * V * 4, peak


def _wrong_loss(p):
    eager = functools.partial(eager_kd_loss, divergence=p.divergence, temperature=p.temperature)
    return lambda x, t: 1.01 * eager(x, t)


def _wrong_grad(p):
    eager = functools.partial(eager_kd_loss, divergence=p.divergence, temperature=p.temperature)

    def f(x, t):
        v = eager(x, t)
        return v + (v - v.detach())  # right value, twice the gradient
    return f


def _nan_loss(p):
    return lambda x, t: (x * float("nan")).sum()


def _add_impls(monkeypatch, *impls):
    """The built-in implementations plus ``impls`` (the bench has no registration hook)."""
    builtin = bench.implementations
    monkeypatch.setattr(bench, "implementations", lambda: {**builtin(), **{i.name: i for i in impls}})


@pytest.fixture
def wrong_impls(monkeypatch):
    impls = [bench.Impl("wrong-loss", _wrong_loss), bench.Impl("wrong-grad", _wrong_grad),
             bench.Impl("nan", _nan_loss)]
    _add_impls(monkeypatch, *impls)
    return [i.name for i in impls]


def test_refuses_implementations_that_disagree(tmp_path, capsys, wrong_impls):
    rc, out = _run(tmp_path, "--N", "16", "--V", "100", "--repeats", "2", "--no-memory",
                   "--impl", "eager", *wrong_impls)
    assert rc == 1  # a refused implementation is a failure of the run
    rows = _rows(out)
    for name in wrong_impls:
        mine = [r for r in rows if r["implementation"] == name]
        assert [r["metric"] for r in mine] == ["failed"], mine
        assert "REFUSED" in mine[0]["note"]
    assert any(r["implementation"] == "eager" and r["metric"] == "time_s" for r in rows)
    printed = capsys.readouterr().out
    assert printed.count("REFUSED") == 3
    assert "gradient error 1.00e+00" in printed  # wrong-grad: twice the gradient
    # the plot is drawn from the CSV, where the refused implementations have no time rows
    from kdkernels.tools.plotting import _series, read_csv
    series = _series(read_csv(str(out / "results.csv")), "time_s", "V", "N", 16)
    assert set(series) == {"eager"}
    _png_ok(out / "forward_kl_float32.png")


def test_impl_filter_and_dtypes(tmp_path):
    rc, out = _run(tmp_path, "--N", "8", "--V", "50", "--repeats", "1", "--no-memory",
                   "--no-plots", "--impl", "kd-reference", "--dtype", "bfloat16", "float16",
                   "--divergence", "jsd")
    assert rc == 0
    rows = _rows(out)
    assert {r["implementation"] for r in rows} == {"kd-reference"}
    assert {(r["dtype"], r["divergence"]) for r in rows if r["metric"] == "time_s"} == {
        (d, v) for d in ("bfloat16", "float16") for v in ("jsd",)}
    assert not list(out.glob("*.png"))


def test_unavailable_implementations_are_skipped_with_reason(tmp_path, capsys):
    rc, out = _run(tmp_path, "--N", "8", "--V", "50", "--repeats", "1", "--no-memory",
                   "--no-plots", "--impl", "liger", "kd-triton", "--divergence", "reverse_kl",
                   "--device", "cpu")  # neither runs on CPU tensors in the bench, GPU or not
    assert rc == 0
    rows = _rows(out)
    assert {r["metric"] for r in rows} == {"skipped"}
    notes = {r["implementation"]: r["note"] for r in rows}
    assert "liger" in notes["liger"].lower()
    assert "kd-triton" in notes
    assert "not reported" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--N", "0"], "--N"),
    (["--V", "abc"], "--V"),
    (["--repeats", "-1"], "--repeats"),
    (["--dtype", "int8"], "--dtype"),
    (["--divergence", "kl"], "--divergence"),
    (["--impl", "nope"], "--impl"),
    (["--device", "tpu"], "--device"),
    (["--temperature", "0"], "--temperature"),
    (["--time-budget", "-3"], "--time-budget"),
])
def test_bad_options_give_clear_errors(tmp_path, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--out", str(tmp_path / "x"), *argv])
    msg = str(e.value.code) if not isinstance(e.value.code, int) else capsys.readouterr().err
    assert needle in msg, msg
    assert not (tmp_path / "x" / "results.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_device_without_gpu_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        main(["bench", "--device", "cuda", "--out", str(tmp_path)])


class _TorchTVD(torch.nn.Module):
    """Stand-in with LigerTVDLoss's interface (probabilities in, batch mean out)."""

    def __init__(self, reduction="batchmean"):
        super().__init__()

    def forward(self, p, q):
        return 0.5 * (p - q).abs().sum(-1).mean()


@pytest.mark.parametrize("divergence", ["forward_kl", "tvd"])
def test_liger_adapter_math_with_torch_stand_ins(divergence):
    # LigerKLDIVLoss is nn.KLDivLoss's interface: the adapter must give T^2 * KL(p || q) batch-mean
    fn = bench.liger_loss_fn(divergence, 2.0, kl_cls=torch.nn.KLDivLoss, tvd_cls=_TorchTVD)
    s = torch.randn(6, 37, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 37, dtype=torch.float64)
    got = fn(s, t)
    (g,) = torch.autograd.grad(got, s)
    x = s.detach().requires_grad_(True)
    want = kd_loss(x, t, divergence, temperature=2.0, backend="reference")
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-9)


def test_liger_unavailable_reasons():
    p = bench.Problem("reverse_kl", "float32", 4, 8, "cpu")
    assert bench._liger_unavailable(p)  # not installed here, or no reverse-KL loss, or CPU
    assert "no reverse_kl" in bench._liger_unavailable(p) or "not installed" in \
        bench._liger_unavailable(p)


def test_byte_model_and_quantiles():
    assert bench.bytes_per_step(bench.Problem("forward_kl", "bfloat16", 3, 5, "cpu")) == 10 * 15
    assert bench.bytes_per_step(bench.Problem("forward_kl", "float32", 3, 5, "cpu")) == 20 * 15
    med, p20, p80 = bench._quantiles([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (med, p20, p80) == (3.0, pytest.approx(1.8), pytest.approx(4.2))


def test_relative_errors():
    g = torch.ones(3, 4)
    assert bench._rel_errors(torch.tensor(2.0), g, torch.tensor(2.0), g) == (0.0, 0.0)
    le, ge = bench._rel_errors(torch.tensor(2.2), g * 1.5, torch.tensor(2.0), g)
    assert le == pytest.approx(0.1) and ge == pytest.approx(0.5)
    bad = g.clone()
    bad[1, 2] = float("nan")
    assert bench._rel_errors(torch.tensor(2.0), bad, torch.tensor(2.0), g)[1] == math.inf
    assert bench._rel_errors(torch.tensor(float("nan")), g, torch.tensor(2.0), g)[0] == math.inf


def _wrong_last_row(p):
    eager = functools.partial(eager_kd_loss, divergence=p.divergence, temperature=p.temperature)

    def f(x, t):  # right value; the gradient of the last row only is wrong
        return eager(x, t) + 1e-3 * (x[-1] ** 2).sum() - 1e-3 * (x[-1].detach() ** 2).sum()
    return f


def test_sampled_gradient_check_refuses_a_wrong_last_row(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "FULL_CHECK_ELEMENTS", 100)  # force the sampled comparison
    monkeypatch.setattr(bench, "SAMPLE_ROWS", 4)
    _add_impls(monkeypatch, bench.Impl("wrong-last-row", _wrong_last_row))
    rc, out = _run(tmp_path, "--N", "37", "--V", "50", "--repeats", "1", "--no-memory",
                   "--no-plots", "--impl", "eager", "kd-reference", "wrong-last-row")
    assert rc == 1
    rows = _rows(out)
    status = {r["implementation"]: r["metric"] for r in rows if r["metric"] in ("time_s", "failed")}
    assert status == {"eager": "time_s", "kd-reference": "time_s", "wrong-last-row": "failed"}
    errs = [float(r["median"]) for r in rows if r["metric"] in ("loss_err", "grad_err")]
    assert max(errs) < 1e-5
