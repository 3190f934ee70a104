"""dump_topk / load_topk round trip, and the ``python -m kdkernels topk-dump`` command."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import kdkernels
from kdkernels.topk import dump_topk, load_topk, read_metadata, topk_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _expected(x, k, T):
    """Top-k of the float64 log-softmax: the reference the stored values are rounded from."""
    lp = torch.log_softmax(x.double() / T, -1)
    return lp.topk(k, dim=-1)


@pytest.mark.parametrize("lp_dtype", ["float32", "float16"])
@pytest.mark.parametrize("idx_dtype", ["int32", "int64"])
def test_round_trip_exact(tmp_path, lp_dtype, idx_dtype):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 50, generator=g) * 4, torch.randn(3, 50, generator=g) * 4,
               torch.randn(1, 7, 50, generator=g).bfloat16()]
    meta = dump_topk(batches, tmp_path / "d", k=8, temperature=2.0, shard_size=4,
                     index_dtype=idx_dtype, logprob_dtype=lp_dtype)
    assert meta["num_tokens"] == 10 + 3 + 7 and len(meta["shards"]) == 5
    assert meta["bytes_per_token"] == 8 * ((4 if idx_dtype == "int32" else 8)
                                           + (2 if lp_dtype == "float16" else 4))
    assert read_metadata(tmp_path / "d")["temperature"] == 2.0
    loaded = list(load_topk(tmp_path / "d"))
    assert len(loaded) == 3
    for b, (idx, lp) in zip(batches, loaded):
        assert idx.shape == b.shape[:-1] + (8,) and idx.dtype == torch.int64
        assert lp.dtype == getattr(torch, lp_dtype)
        want_lp, want_idx = topk_logprobs(b, 8, 2.0)   # what was written, bit for bit
        assert torch.equal(idx, want_idx)
        assert torch.equal(lp, want_lp.to(lp.dtype))
        e_lp, e_idx = _expected(b, 8, 2.0)            # and it is the right top-k
        assert torch.equal(torch.sort(idx, -1).values, torch.sort(e_idx, -1).values)
        tol = 1e-3 if lp_dtype == "float16" else 1e-5
        torch.testing.assert_close(lp.double(), e_lp, rtol=tol, atol=tol)
    # per shard
    per_shard = list(load_topk(tmp_path / "d", batch_shapes=False))
    assert [len(i) for i, _ in per_shard] == [4, 4, 4, 4, 4]
    flat = torch.cat([i for i, _ in per_shard])
    assert torch.equal(flat, torch.cat([i.reshape(-1, 8) for i, _ in loaded]))


def test_callable_source_and_loss(tmp_path):
    """A generator function that runs the 'teacher' batch by batch; the loaded pairs feed
    sparse_kd_loss and reproduce the loss computed from the in-memory top-k."""
    g = torch.Generator().manual_seed(1)
    teacher = [torch.randn(4, 30, generator=g) for _ in range(3)]

    def run_teacher():
        yield from teacher

    dump_topk(run_teacher, tmp_path, k=30, temperature=1.5, logprob_dtype="float32")
    student = torch.randn(4, 30, generator=g)
    for t, (idx, lp) in zip(teacher, load_topk(tmp_path)):
        a = kdkernels.sparse_kd_loss(student, idx, lp, temperature=1.5)
        b = kdkernels.kd_loss(student, t, temperature=1.5, backend="reference")
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)   # K = V: equals the dense loss


def test_bad_arguments(tmp_path):
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="k must be a positive int"):
        dump_topk(x, tmp_path / "a", k=0)
    with pytest.raises(ValueError, match="k=11 exceeds the vocabulary size V=10"):
        dump_topk(x, tmp_path / "b", k=11)
    with pytest.raises(ValueError, match="temperature"):
        dump_topk(x, tmp_path / "c", k=2, temperature=0)
    with pytest.raises(ValueError, match="logprob_dtype"):
        dump_topk(x, tmp_path / "d", k=2, logprob_dtype="bfloat16")
    with pytest.raises(ValueError, match="batch 1 has vocabulary size 9"):
        dump_topk([x, torch.randn(2, 9)], tmp_path / "e", k=2)
    with pytest.raises(TypeError, match="floating-point"):
        dump_topk(torch.ones(3, 4, dtype=torch.int64), tmp_path / "f", k=2)
    dump_topk(x, tmp_path / "g", k=2)
    with pytest.raises(FileExistsError, match="not empty"):
        dump_topk(x, tmp_path / "g", k=2)
    dump_topk(x * 2, tmp_path / "g", k=3, overwrite=True)
    assert read_metadata(tmp_path / "g")["k"] == 3
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        list(load_topk(tmp_path / "nothing"))


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "kdkernels", "topk-dump", *map(str, args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_npy_and_pt(tmp_path):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 6, 40, generator=g)
    np.save(tmp_path / "logits.npy", x.numpy())
    r = _cli(tmp_path / "logits.npy", tmp_path / "npy", "--k", 5, "--temperature", 2,
             "--batch-rows", 5, "--shard-size", 7, "--logprob-dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "12 tokens" in r.stdout and "B/token" in r.stdout
    idx = torch.cat([i for i, _ in load_topk(tmp_path / "npy")])
    lp = torch.cat([p for _, p in load_topk(tmp_path / "npy")])
    want_lp, want_idx = topk_logprobs(x.reshape(-1, 40), 5, 2.0)
    assert torch.equal(idx, want_idx) and torch.equal(lp, want_lp)
    meta = json.loads((tmp_path / "npy" / "metadata.json").read_text())
    assert meta["vocab_size"] == 40 and meta["temperature"] == 2.0 and meta["k"] == 5

    torch.save({"logits": x.bfloat16()}, tmp_path / "logits.pt")
    r = _cli(tmp_path / "logits.pt", tmp_path / "pt", "--k", 4)
    assert r.returncode != 0 and "--key" in r.stderr
    r = _cli(tmp_path / "logits.pt", tmp_path / "pt", "--k", 4, "--key", "logits")
    assert r.returncode == 0, r.stderr
    (idx, lp), = list(load_topk(tmp_path / "pt"))
    want_lp, want_idx = topk_logprobs(x.bfloat16(), 4, 1.0)
    assert idx.shape == (2, 6, 4) and torch.equal(idx, want_idx)
    assert torch.equal(lp, want_lp.half())


def test_storage_per_token_figures(tmp_path):
    """K = 64 vs dense V = 128256 (payload bytes; the .npz container adds a little per shard)."""
    V, K = 128256, 64
    x = torch.randn(16, V)
    meta = dump_topk(x, tmp_path, k=K, temperature=1.0)
    assert meta["bytes_per_token"] == 384                 # int32 + fp16
    on_disk = os.path.getsize(tmp_path / meta["shards"][0]["file"]) / 16
    assert 384 <= on_disk < 384 + 64                      # 16 tokens: container ~ 0.5 KB / 16
    assert 2 * V / 384 > 600                              # vs bf16 dense logits: 256512 B/token
    assert math.isclose(meta["bytes_per_token"] / (2 * V), 0.0015, rel_tol=0.01)
