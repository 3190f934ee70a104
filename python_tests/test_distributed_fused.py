"""fused_linear_kd_loss with a vocab-sharded lm_head (process_group=), gloo on CPU processes.

Each rank holds a vocabulary shard of the student weight [V_local, Ds] (and bias) and of the
teacher weight (same boundaries; the teacher's padded rows only on the last rank) and the same
hidden states. One process group per world size (2 and 4 ranks) runs every case; each rank writes
its loss, its hidden gradient and its weight/bias gradient shards to a file, and the tests compare
them, reassembled, with the single-process float64 oracle that materializes the full logits
(``oracle_fused`` of test_fused_linear.py). A hang fails (collective timeout and a deadline).
"""
import functools
import os
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch

import kdkernels
from kdkernels import divergences

from conftest import assert_close
from test_distributed import (COLLECTIVES, KERNEL_REASONS, NEG_INF_COLS, PARAMS, SPLITS,
                              _free_port, shard_bounds)
from test_fused_linear import oracle_fused, plain_fused

V, VT, DS, DT = 37, 40, 12, 16               # VT > V: the teacher's padding sits on the last rank
B, L = 3, 7                                  # N = 21 rows
DEADLINE_S = 120
F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


def _case(world, id, div="forward_kl", dtype=F64, **kw):
    c = dict(world=world, id=f"w{world}-{id}", div=div, dtype=dtype, T=2.0, sw=1.0, hw=0.0,
             labels="some", reduction="batchmean", bias=True, softcap=None, chunk=8,
             strided=False, ugly=None, start="default", num_items=None, module=False,
             kind="tp", seed=len(id) * 11 + world, backend="reference", suite="main")
    c.update(kw)
    return c


def make_kernel_cases():
    """The kernel backends on the shards (suite "kernels", its own process group): every
    divergence in float32 with −inf bias columns, labels with ignored rows and the hard term;
    |logits| ≈ 1e4; soft-capping with "none"; all rows ignored; bfloat16; no labels."""
    out = []
    for be in ("cpu", "triton", "cuda"):
        k = dict(backend=be, suite="kernels")
        for w in (2, 4):
            for name in divergences.kernel_names():
                out.append(_case(w, f"{be}-{name}-f32-neginf-hard", name, F32, T=1.5, hw=0.5,
                                 ugly="neginf", chunk=8, strided=True, **k))
            out += [
                _case(w, f"{be}-jsd-f32-big", "jsd", F32, T=2.0, ugly="big", chunk=11,
                      start="explicit", **k),
                _case(w, f"{be}-rkl-softcap-none", "reverse_kl", F32, softcap=3.0, hw=0.3,
                      reduction="none", chunk=10, **k),
                _case(w, f"{be}-tvd-allignored", "tvd", F32, labels="none_counted", hw=0.5, **k),
                _case(w, f"{be}-fkl-bf16-T1", "forward_kl", BF16, T=1.0, hw=0.5, chunk=None,
                      **k),
                _case(w, f"{be}-skl-nolabels-sum", "skew_kl", F32, labels=None,
                      reduction="sum", bias=False, **k),
            ]
        out.append(_case(2, f"{be}-collective-count", dtype=F32, kind="count", **k))
    return out


def make_cases():
    out = []
    for w in (2, 4):
        for name in divergences.kernel_names():
            out.append(_case(w, f"{name}-f64-hard", name, F64, sw=1.3, hw=0.7, strided=True))
            out.append(_case(w, f"{name}-f32-neginf", name, F32, T=1.5, hw=0.5, ugly="neginf",
                             chunk=5, start="explicit"))
        out += [
            _case(w, "fkl-f32-big", "forward_kl", F32, T=1.0, ugly="big", hw=0.3, chunk=4),
            _case(w, "rkl-softcap-none", "reverse_kl", F32, softcap=3.0, hw=0.3,
                  reduction="none", chunk=6),
            _case(w, "jsd-softcap-f64", "jsd", F64, softcap=2.5, chunk=10, strided=True),
            _case(w, "tvd-allignored", "tvd", F32, labels="none_counted", hw=0.5),
            _case(w, "skl-nolabels-sum-nobias", "skew_kl", F64, labels=None, reduction="sum",
                  bias=False, chunk=None),
            _case(w, "jsd-mean", "jsd", F64, reduction="mean", hw=0.4, start="explicit"),
            _case(w, "fkl-numitems", "forward_kl", F64, num_items=23, hw=1.0, chunk=21),
            _case(w, "hard-only", "forward_kl", F64, sw=0.0, hw=1.0, chunk=1),
            _case(w, "srkl-none-hard", "skew_reverse_kl", F64, reduction="none", hw=0.6),
            _case(w, "fkl-bf16", "forward_kl", BF16, hw=0.5),
            _case(w, "rkl-module", "reverse_kl", F32, module=True, hw=0.5, chunk=9),
            _case(w, "bad-label", "forward_kl", F64, labels="out_of_range", hw=1.0),
        ]
    out.append(_case(2, "collective-count", kind="count"))
    out.append(_case(4, "frozen-hidden", "jsd", F64, hw=0.5, kind="partial"))
    return out


CASES = make_cases() + make_kernel_cases()


def make_inputs(c):
    """Full (unsharded) student and teacher heads, hidden states and labels; identical in every
    process for a case. ``hs`` is a [B, L, Ds] view of ``base`` (strided when asked)."""
    g = torch.Generator().manual_seed(c["seed"])

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=F64) * scale

    base = randn(B, L + 1, DS)
    ht = randn(B, L, DT)
    ws, wt = randn(V, DS, scale=0.6), randn(VT, DT, scale=0.5)
    bs = randn(V) if c["bias"] else None
    bt = randn(VT) if c["bias"] else None
    if c["ugly"] == "big":  # |logits| ~ 1e4
        bs, bt = bs + 1e4, bt - 1e4
    if c["ugly"] == "neginf":  # -inf logits shared by teacher and student columns
        bs[NEG_INF_COLS] = float("-inf")
        bt[NEG_INF_COLS] = float("-inf")
    cast = (lambda x: None if x is None else x.to(c["dtype"]))
    base, ht, ws, wt, bs, bt = map(cast, (base, ht, ws, wt, bs, bt))
    hs = base[:, :-1] if c["strided"] else base[:, 1:].contiguous()
    labels = None
    if c["labels"] is not None:
        allowed = torch.tensor([j for j in range(V) if j not in NEG_INF_COLS])
        labels = allowed[torch.randint(len(allowed), (B, L), generator=g)]
        labels[torch.rand(B, L, generator=g) < 0.3] = -100
        if c["labels"] == "none_counted":
            labels[:] = -100
        if c["labels"] == "out_of_range":
            labels[1, 2] = V
    return base, hs, ws, bs, ht, wt, bt, labels


def loss_kwargs(c):
    kw = dict(divergence=c["div"], temperature=c["T"], soft_weight=c["sw"], hard_weight=c["hw"],
              reduction=c["reduction"], softcap=c["softcap"], **PARAMS.get(c["div"], {}))
    if c["num_items"] is not None:
        kw["num_items_in_batch"] = torch.tensor(c["num_items"])
    return kw


def teacher_rows(splits, r):
    """The teacher shard's rows: the student's boundaries, the padding on the last rank."""
    o0, o1 = shard_bounds(splits, r)
    return slice(o0, VT if r == len(splits) - 1 else o1)


# ---- the spawned ranks --------------------------------------------------------------------

def _shard_loss(c, group, rank, world, hs, ws_l, bs_l, ht, wt_l, bt_l, labels):
    kw = loss_kwargs(c)
    start = shard_bounds(SPLITS[world], rank)[0] if c["start"] == "explicit" else None
    if c["module"]:
        nib = kw.pop("num_items_in_batch", None)
        crit = kdkernels.FusedLinearKDLoss(chunk_size=c["chunk"], process_group=group,
                                           vocab_start_index=start, **kw)
        return crit(hs, ws_l, ht, wt_l, labels, student_bias=bs_l, teacher_bias=bt_l,
                    num_items_in_batch=nib)
    return kdkernels.fused_linear_kd_loss(hs, ws_l, ht, wt_l, student_bias=bs_l,
                                          teacher_bias=bt_l, labels=labels,
                                          chunk_size=c["chunk"], process_group=group,
                                          vocab_start_index=start, backend=c["backend"], **kw)


def _count_collectives(c, rank, world):
    """Collectives issued by forward and by backward of one call, per option set."""
    import torch.distributed as dist
    calls = []
    saved = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper
    out = {}
    _, hs, ws, _, ht, wt, _, labels = make_inputs(c)
    hs, ws, ht, wt = (x.to(c["dtype"]) for x in (hs, ws, ht, wt))
    o0, o1 = shard_bounds(SPLITS[world], rank)
    tr = teacher_rows(SPLITS[world], rank)
    try:
        for n, fn in saved.items():
            setattr(dist, n, counting(n, fn))
        for name in divergences.kernel_names():
            for hw, start, reduction, chunk in ((0.0, None, "batchmean", 8),
                                                (0.5, None, "batchmean", 5),
                                                (0.5, o0, "none", 8)):
                h = hs.detach().clone().requires_grad_(True)
                w = ws[o0:o1].clone().requires_grad_(True)
                del calls[:]
                loss = kdkernels.fused_linear_kd_loss(
                    h, w, ht, wt[tr], labels=labels, divergence=name, temperature=2.0,
                    hard_weight=hw, reduction=reduction, chunk_size=chunk,
                    process_group=dist.group.WORLD, vocab_start_index=start,
                    backend=c["backend"])
                fwd = len(calls)
                loss.sum().backward()
                out[(name, hw, start is None, reduction, chunk)] = (fwd, len(calls) - fwd)
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)
    return out


def _run_case(c, rank, world):
    import torch.distributed as dist
    if c["kind"] == "count":
        return {"counts": _count_collectives(c, rank, world)}
    if c["kind"] == "partial":
        return _partial_grads(c, rank, world)
    base, _, ws, bs, ht, wt, bt, labels = make_inputs(c)
    splits = SPLITS[world]
    o0, o1 = shard_bounds(splits, rank)
    tr = teacher_rows(splits, rank)
    leaf = base.clone().requires_grad_(True)
    hs = leaf[:, :-1] if c["strided"] else leaf[:, 1:]
    ws_l = ws[o0:o1].clone().requires_grad_(True)
    bs_l = None if bs is None else bs[o0:o1].clone().requires_grad_(True)
    bt_l = None if bt is None else bt[tr]
    loss = _shard_loss(c, dist.group.WORLD, rank, world, hs, ws_l, bs_l, ht, wt[tr], bt_l, labels)
    loss.sum().backward()
    gh = leaf.grad[:, :-1] if c["strided"] else leaf.grad[:, 1:]
    other = leaf.grad[:, -1:] if c["strided"] else leaf.grad[:, :1]
    assert not other.any(), "gradient leaked into the hidden position outside the view"
    return {"loss": loss.detach(), "gh": gh.detach().clone(), "gw": ws_l.grad.detach(),
            "gb": None if bs_l is None else bs_l.grad.detach()}


def _partial_grads(c, rank, world):
    """Frozen hidden states (only the weight shard learns), and a call under torch.no_grad()."""
    import torch.distributed as dist
    _, hs, ws, bs, ht, wt, bt, labels = make_inputs(c)
    o0, o1 = shard_bounds(SPLITS[world], rank)
    tr = teacher_rows(SPLITS[world], rank)
    ws_l = ws[o0:o1].clone().requires_grad_(True)
    args = (c, dist.group.WORLD, rank, world, hs, ws_l, bs[o0:o1], ht, wt[tr], bt[tr], labels)
    loss = _shard_loss(*args)
    loss.backward()
    with torch.no_grad():
        loss_ng = _shard_loss(*args)
    assert not loss_ng.requires_grad
    return {"loss": loss.detach(), "loss_ng": loss_ng, "gw": ws_l.grad}


def _worker(rank, world, port, outdir, suite="main"):
    import torch.distributed as dist
    import kdkernels.backends.reference as kdd  # the row chunks of every PyTorch path
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    kdd.CHUNK_ELEMENTS = 64  # row chunks inside the vocab-parallel rows too
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    for c in CASES:
        if c["world"] != world or c["suite"] != suite or KERNEL_REASONS.get(c["backend"]):
            continue
        try:
            res = _run_case(c, rank, world)
        except Exception as e:  # recorded and reported by the test of this case
            res = {"error": type(e).__name__, "message": str(e), "tb": traceback.format_exc()}
        torch.save(res, os.path.join(outdir, f"{c['id']}.{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@functools.lru_cache(maxsize=None)
def run_group(world, suite="main"):
    """Spawn ``world`` gloo ranks once, run all their cases of ``suite``; returns the results
    folder."""
    import torch.multiprocessing as mp
    outdir = tempfile.mkdtemp(prefix=f"kd_fused_tp{world}_{suite}_")
    ctx = mp.start_processes(_worker, args=(world, _free_port(), outdir, suite), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S * (3 if suite == "kernels" else 1)
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} gloo ranks did not finish in {DEADLINE_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return outdir


def results(c):
    reason = KERNEL_REASONS.get(c["backend"])
    if reason:
        pytest.skip(f"backend {c['backend']!r} unavailable: {reason}")
    outdir = run_group(c["world"], c["suite"])
    return [torch.load(os.path.join(outdir, f"{c['id']}.{r}.pt")) for r in range(c["world"])]


# ---- the tests ----------------------------------------------------------------------------

def _expected(c, hs, ws, bs, ht, wt, bt, labels):
    kw = dict(divergence_name=c["div"], temperature=c["T"], labels=labels, soft_weight=c["sw"],
              hard_weight=c["hw"], **PARAMS.get(c["div"], {}))
    exp = oracle_fused(hs, ws, bs, ht, wt, bt, softcap=c["softcap"], reduction=c["reduction"],
                       num_items_in_batch=c["num_items"], **kw)
    plain = None
    if c["dtype"] != F64:  # single-process PyTorch in the input dtype: the error yardstick
        assert c["num_items"] is None
        kw.pop("divergence_name")
        kw["labels"] = None if labels is None else labels.reshape(-1)
        loss, grads = plain_fused(hs.reshape(-1, DS), ws, bs, ht.reshape(-1, DT), wt, bt, c["div"],
                                  reduction=c["reduction"], softcap=c["softcap"], **kw)
        grads[0] = grads[0].view(hs.shape)
        plain = (loss.view(exp[0].shape), grads)
    return exp, plain


TP_CASES = [c for c in CASES if c["kind"] == "tp" and c["labels"] != "out_of_range"]


@pytest.mark.parametrize("c", TP_CASES, ids=[c["id"] for c in TP_CASES])
def test_vocab_sharded_fused_matches_oracle(c):
    res = results(c)
    for r, x in enumerate(res):
        assert "error" not in x, f"rank {r}: {x.get('tb')}"
    _, hs, ws, bs, ht, wt, bt, labels = make_inputs(c)
    (exp_loss, exp_grads), plain = _expected(c, hs, ws, bs, ht, wt, bt, labels)
    pl, pg = (None, [None] * 3) if plain is None else plain
    dt = c["dtype"]
    for r, x in enumerate(res):  # the loss is replicated: every rank has the same value
        assert torch.equal(x["loss"], res[0]["loss"]), f"rank {r} loss differs from rank 0"
    loss = res[0]["loss"]
    assert loss.dtype == (F64 if dt == F64 else F32)
    assert loss.shape == ((B, L) if c["reduction"] == "none" else ())
    assert_close(loss, exp_loss.to(loss.dtype), dt, pl, what="loss")
    for r, x in enumerate(res):  # every rank gets the full hidden gradient
        assert x["gh"].dtype == dt and x["gh"].shape == hs.shape
        assert_close(x["gh"], exp_grads[0].to(dt), dt, pg[0], what=f"rank {r} grad hidden")
    gw = torch.cat([x["gw"] for x in res], 0)
    assert gw.dtype == dt and gw.shape == ws.shape
    assert_close(gw, exp_grads[1].to(dt), dt, pg[1], what="grad weight")
    if bs is not None:
        gb = torch.cat([x["gb"] for x in res], 0)
        assert gb.dtype == dt and gb.shape == bs.shape
        assert_close(gb, exp_grads[2].to(dt), dt, pg[2], what="grad bias")
    if labels is not None:
        ignored = labels == -100
        for x in res:
            assert not x["gh"][ignored].any(), "ignored rows must get an exactly zero gradient"
    if c["labels"] == "none_counted":
        assert float(loss) == 0.0 and not gw.any()
    if c["ugly"] == "neginf" and bs is not None:
        gb = torch.cat([x["gb"] for x in res], 0)
        assert not gb[NEG_INF_COLS].any(), "-inf columns must get a zero gradient"


def test_frozen_hidden_and_no_grad():
    c = next(c for c in CASES if c["kind"] == "partial")
    res = results(c)
    for r, x in enumerate(res):
        assert "error" not in x, f"rank {r}: {x.get('tb')}"
    _, hs, ws, bs, ht, wt, bt, labels = make_inputs(c)
    (exp_loss, exp_grads), _ = _expected(c, hs, ws, bs, ht, wt, bt, labels)
    for x in res:
        assert_close(x["loss"], exp_loss, F64, what="loss")
        assert_close(x["loss_ng"], exp_loss, F64, what="loss under no_grad")
    assert_close(torch.cat([x["gw"] for x in res], 0), exp_grads[1], F64, what="grad weight")


BAD = [c for c in CASES if c["labels"] == "out_of_range"]


@pytest.mark.parametrize("c", BAD, ids=[c["id"] for c in BAD])
def test_label_outside_global_vocab_raises_on_every_rank(c):
    for r, x in enumerate(results(c)):
        assert x.get("error") == "ValueError", f"rank {r}: {x}"
        assert "global vocabulary" in x["message"] and str(V) in x["message"]


COUNT_CASES = [c for c in CASES if c["kind"] == "count"]


@pytest.mark.parametrize("c", COUNT_CASES, ids=[c["id"] for c in COUNT_CASES])
def test_collectives_per_call_are_as_documented(c):
    """Forward, per chunk: 1 all_gather (forward/reverse KL) or all_gather + all_reduce (the
    others); then ONE all_reduce of the hidden gradient; +1 all_gather of the shard sizes with
    the hard term and default offsets. Backward: none, except reduction="none", whose backward
    recomputes the chunks (same per-chunk collectives + the hidden-gradient all_reduce). The
    same on the kernel backends."""
    res = results(c)
    for r, x in enumerate(res):
        assert "error" not in x, f"rank {r}: {x.get('tb')}"
    counts = res[0]["counts"]
    assert len(counts) == 3 * len(divergences.kernel_names())
    n = B * L
    for (name, hw, default_start, reduction, chunk), (fwd, bwd) in counts.items():
        per_chunk = 1 if divergences.get(name).online else 2
        chunks = -(-n // chunk)
        offsets = 1 if hw and default_start else 0
        if reduction == "none":
            expected = (chunks * per_chunk + offsets, chunks * per_chunk + 1)
        else:
            expected = (chunks * per_chunk + 1 + offsets, 0)
        assert (fwd, bwd) == expected, (name, hw, default_start, reduction, fwd, bwd)


# ---- single-process checks (no process group needed) ----------------------------------------

def test_vocab_start_index_needs_process_group():
    _, hs, ws, _, ht, wt, _, _ = make_inputs(_case(2, "x"))
    with pytest.raises(ValueError, match="vocab_start_index"):
        kdkernels.fused_linear_kd_loss(hs, ws, ht, wt, vocab_start_index=0)


def test_process_group_needs_initialised_distributed():
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.fail("this test process must not hold a process group")
    _, hs, ws, _, ht, wt, _, _ = make_inputs(_case(2, "x"))
    with pytest.raises(ValueError, match="process_group"):
        kdkernels.fused_linear_kd_loss(hs, ws, ht, wt, process_group=object())
