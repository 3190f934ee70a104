"""``python -m kdkernels demo`` at a tiny setting: runs in seconds, prints the table, writes a PNG
that parses and a CSV whose two curves agree; the memory probe sees eager hold more than kdkernels."""
import argparse
import os

import pytest
import torch

from kdkernels import __main__ as cli
from kdkernels.tools import demo

TINY = ["--steps", "6", "--teacher-steps", "3", "--vocab", "300", "--tokens", "3000", "--batch",
        "2", "--context", "8", "--teacher-dim", "32", "--teacher-layers", "1", "--student-dim",
        "16", "--student-layers", "1", "--no-progress"]


def test_demo_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["demo", *TINY, "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "| method" in text and "eager (naive PyTorch)" in text and "kdkernels.kd_loss" in text
    assert "within --rtol" in text
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    img = plt.imread(str(out / "curves.png"))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    rows = (out / "curves.csv").read_text().strip().splitlines()
    assert rows[0] == "step,eager,kdkernels,diff_over_first_loss" and len(rows) == 1 + 6
    for r in rows[1:]:
        _, a, b, rel = r.split(",")
        assert abs(float(a) - float(b)) <= 1e-3 * abs(float(a)) and float(a) > 0
    # peak-memory column was filled (Linux /proc present)
    if os.path.exists("/proc/self/clear_refs"):
        assert "peak extra memory: eager / kdkernels" in text


def test_demo_rejects_bad_arguments(tmp_path):
    p = argparse.ArgumentParser()
    demo.add_demo_arguments(p)
    args = p.parse_args([*TINY, "--steps", "0", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--steps"):
        demo.run_demo(args)


def test_tokenizer_and_synthetic_text():
    text = demo.synthetic_text(50, 400, seed=3)
    assert text == demo.synthetic_text(50, 400, seed=3) and len(text.split()) == 400
    tok = demo.WordTokenizer.from_text(text, 20)
    assert len(tok) == 20
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.numel() == 400 and int(ids.max()) < 20
    top = tok.itos[1]
    assert tok.decode(tok.encode(top + " zzz-not-a-word")) == top + " <unk>"
    assert len(set(demo.lexicon(5000))) == 5000
    full = demo.WordTokenizer.from_text("a b a", 10, lexicon=["a", "b", "c", "d"])
    assert full.itos == ["<unk>", "a", "b", "c", "d"]
    with pytest.raises(ValueError, match="vocab_size"):
        demo.WordTokenizer.from_text(text, 1)


def test_tiny_gpt_is_causal():
    m = demo.TinyGPT(vocab=30, dim=16, layers=1, heads=2, context=8)
    x = torch.randint(0, 30, (1, 8))
    y = x.clone()
    y[0, 5] = (y[0, 5] + 1) % 30
    a, b = m(x), m(y)
    assert torch.equal(a[0, :5], b[0, :5]) and not torch.equal(a[0, 5:], b[0, 5:])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_loss_call_memory_eager_holds_more():
    N, V = 1024, 4096             # logits: 16 MiB fp32, several row chunks for the reference
    eager = demo.loss_call_memory("eager", N, V, "forward_kl", 2.0, threads=1)
    fused = demo.loss_call_memory("kdkernels", N, V, "forward_kl", 2.0, threads=1)
    assert eager["reset_ok"] and fused["reset_ok"]
    assert abs(eager["loss"] - fused["loss"]) <= 1e-4 * abs(eager["loss"])
    logits_mib = N * V * 4 / 2**20
    assert eager["extra_mib"] >= 3 * logits_mib      # eager keeps several [N, V] fp32 buffers
    assert fused["extra_mib"] < eager["extra_mib"]


def test_demo_without_matplotlib_exits_0_with_a_note(tmp_path, capsys, monkeypatch):
    """Issue 21: without the optional matplotlib the demo used to train, then die while plotting.
    Now it says so before the work, writes the table and curves.csv, and exits 0."""
    import sys
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` -> ImportError
    assert not demo.have_matplotlib()
    out = tmp_path / "out"
    rc = cli.main(["demo", *TINY, "--no-memory", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    first = text.splitlines()[0]
    assert first.startswith("note: matplotlib is not installed") and "pip install matplotlib" in first
    assert "| method" in text and "no curves.png" in text.splitlines()[-1]
    assert (out / "curves.csv").exists() and not (out / "curves.png").exists()
