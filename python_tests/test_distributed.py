"""Vocab-parallel and data-parallel distillation on torch.distributed (gloo, CPU processes).

Suite "main" (the reference's chunked PyTorch path, backend="reference") and suite "kernels"
(the kernel backends on each rank's shard: C++ CPU, Triton under its interpreter, CUDA under its
host emulation). One process group per world size (2 and 4 ranks) and suite runs every case; each rank writes its loss and
its gradient shard to a file, and the tests here compare the reassembled results with the
single-process float64 oracle on the full vocabulary (python_tests/oracle.py). A hang fails the
tests (process-group timeout and a deadline on the spawned group) instead of blocking CI.
"""
import functools
import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch

import kdkernels
from kdkernels import divergences

from conftest import assert_close
import oracle

V = 37
SPLITS = {2: [13, 24], 4: [10, 3, 14, 10]}   # uneven: V is not divisible by the world size
NEG_INF_COLS = [0, 5, 10, 11, 12, 36]         # with 4 ranks, the whole of shard 1 is -inf
PARAMS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
DEADLINE_S = 150
F64, F32, BF16 = torch.float64, torch.float32, torch.bfloat16


def _case(world, id, div="forward_kl", dtype=F64, **kw):
    c = dict(world=world, id=f"w{world}-{id}", div=div, dtype=dtype, T=2.0, sw=1.0, hw=0.0,
             labels="some", reduction="batchmean", strided=False, wide=False, ugly=None,
             start="default", num_items=None, module=False, kind="tp", seed=len(id) * 7 + world,
             backend="reference", suite="main")
    c.update(kw)
    return c


def kernel_backends():
    """{name: reason or None} of the kernel backends the gloo (CPU) cases run: the C++ CPU
    kernels; Triton under its interpreter and CUDA under its host emulation, on a machine without
    a GPU (conftest switches both on there)."""
    from kdkernels import backends
    from kdkernels.backends import cuda_emulate
    out = {"cpu": backends.availability("cpu")}
    gpu = torch.cuda.is_available()
    out["triton"] = ("a GPU machine runs Triton compiled, not on CPU tensors" if gpu
                     else backends.availability("triton"))
    out["cuda"] = ("a GPU machine runs CUDA on CUDA tensors (test_nccl_on_cuda_matches_oracle)"
                   if gpu else cuda_emulate.unavailable_reason())
    return out


def make_kernel_cases():
    """Every kernel backend on the shards (suite "kernels", a process group of its own): every
    divergence in float32 with −inf columns (with 4 ranks a whole shard is −inf), strided views,
    a wider teacher, labels with ignored rows and the hard term (T = 1.5, its own normaliser);
    every divergence with |logits| ≈ 1e4 and no hard term; and a few option sets."""
    out = []
    for be in ("cpu", "triton", "cuda"):
        k = dict(backend=be, suite="kernels")
        for w in (2, 4):
            for name in divergences.kernel_names():
                out.append(_case(w, f"{be}-{name}-f32-ugly-hard", name, F32, T=1.5, hw=0.5,
                                 ugly="neginf", strided=True, wide=True, **k))
                out.append(_case(w, f"{be}-{name}-f32-big-soft", name, F32, T=2.0, ugly="big",
                                 start="explicit", **k))
            out += [
                _case(w, f"{be}-fkl-T1-hard", "forward_kl", F32, T=1.0, hw=0.7, **k),
                _case(w, f"{be}-jsd-T1-hard-none", "jsd", F32, T=1.0, hw=0.7, reduction="none",
                      **k),
                _case(w, f"{be}-hard-only", "reverse_kl", F32, sw=0.0, hw=1.0, wide=True, **k),
                _case(w, f"{be}-rkl-allignored", "reverse_kl", F32, labels="none_counted",
                      hw=0.5, **k),
                _case(w, f"{be}-tvd-nolabels-sum", "tvd", F32, labels=None, reduction="sum",
                      **k),
                _case(w, f"{be}-skl-bf16", "skew_kl", BF16, hw=0.5, **k),
            ]
        out.append(_case(2, f"{be}-collective-count", dtype=F32, kind="count", **k))
        out.append(_case(2, f"{be}-refusals", dtype=F32, kind="refuse", **k))
    return out


def make_cases():
    out = []
    for w in (2, 4):
        for name in divergences.kernel_names():
            out.append(_case(w, f"{name}-f64-hard", name, F64, T=2.0, sw=1.3, hw=0.7))
            out.append(_case(w, f"{name}-f32-ugly", name, F32, T=1.5, hw=0.5, ugly="neginf",
                             strided=True, wide=True, start="explicit"))
        out += [
            _case(w, "fkl-f32-big", "forward_kl", F32, T=1.0, ugly="big", hw=0.3),
            _case(w, "jsd-f32-big", "jsd", F32, T=3.0, ugly="big"),
            _case(w, "rkl-allignored", "reverse_kl", F32, labels="none_counted", hw=0.5),
            _case(w, "skl-nolabels-sum", "skew_kl", F64, labels=None, reduction="sum"),
            _case(w, "tvd-none", "tvd", F64, reduction="none", hw=0.2, strided=True),
            _case(w, "jsd-mean", "jsd", F64, reduction="mean", hw=0.4, start="explicit"),
            _case(w, "fkl-numitems", "forward_kl", F64, num_items=23, hw=1.0),
            _case(w, "hard-only", "forward_kl", F64, sw=0.0, hw=1.0, wide=True),
            _case(w, "fkl-bf16", "forward_kl", BF16, hw=0.5),
            _case(w, "srkl-module", "skew_reverse_kl", F32, module=True, hw=0.5),
            _case(w, "bad-label", "forward_kl", F64, labels="out_of_range", hw=1.0),
        ]
    out.append(_case(2, "dp-halves", "jsd", F64, kind="dp", hw=0.5))
    out.append(_case(2, "dp-halves-f32", "reverse_kl", F32, kind="dp", hw=0.5))
    out.append(_case(4, "tp2-dp2", "skew_kl", F64, kind="tp2dp2", hw=0.5))
    out.append(_case(2, "collective-count", kind="count"))
    return out


CASES = make_cases() + make_kernel_cases()
KERNEL_REASONS = kernel_backends()


def gpu_cases(world):
    """NCCL on CUDA tensors: one rank per GPU (a single GPU gives a one-rank group)."""
    splits = SPLITS.get(world) or [len(x) for x in torch.arange(V).tensor_split(world)]
    out = []
    for name in divergences.kernel_names():
        out.append(_case(world, f"nccl-{name}-f32", name, F32, T=1.5, hw=0.5, ugly="neginf",
                         strided=True, device="cuda", splits=splits, backend="auto"))
        out.append(_case(world, f"nccl-{name}-bf16", name, BF16, hw=0.5, device="cuda",
                         splits=splits, start="explicit", backend="auto"))
    return out


def make_inputs(c):
    """Full-vocabulary student view, teacher, labels (identical in every process for a case)."""
    g = torch.Generator().manual_seed(c["seed"])
    B, L = 2, 5
    base = torch.randn(B, L + 1, V, generator=g, dtype=F64) * 2
    teacher = torch.randn(B, L, V, generator=g, dtype=F64) * 2
    if c["ugly"] == "big":
        base = base * 2 + 1e4
        teacher = teacher * 2 - 1e4
    if c["ugly"] == "neginf":
        base[..., NEG_INF_COLS] = float("-inf")
        teacher[..., NEG_INF_COLS] = float("-inf")
    base = base.to(c["dtype"])
    teacher = teacher.to(c["dtype"])
    student = base[:, :-1] if c["strided"] else base[:, 1:].contiguous()
    labels = None
    if c["labels"] is not None:
        allowed = torch.tensor([j for j in range(V) if j not in NEG_INF_COLS])
        labels = allowed[torch.randint(len(allowed), (B, L), generator=g)]
        labels[torch.rand(B, L, generator=g) < 0.3] = -100
        if c["labels"] == "none_counted":
            labels[:] = -100
        if c["labels"] == "out_of_range":
            labels[0, 1] = V
    return base, student, teacher, labels


def loss_kwargs(c):
    kw = dict(divergence=c["div"], temperature=c["T"], labels=None, soft_weight=c["sw"],
              hard_weight=c["hw"], reduction=c["reduction"], **PARAMS.get(c["div"], {}))
    if c["num_items"] is not None:
        kw["num_items_in_batch"] = torch.tensor(c["num_items"])
    return kw


def shard_bounds(splits, r):
    return sum(splits[:r]), sum(splits[:r + 1])


# ---- the spawned ranks --------------------------------------------------------------------

def _tp_loss(c, student, teacher, labels, group, rank_in_group, splits, num_items=None):
    o0, o1 = shard_bounds(splits, rank_in_group)
    s = student[..., o0:o1]
    t = teacher[..., o0:o1]
    if c["wide"]:  # extra teacher columns past the shard are dropped (their values are junk)
        t = torch.cat([t, torch.full_like(t[..., :2], 50.0)], -1)
    kw = loss_kwargs(c)
    kw["labels"] = labels
    kw["backend"] = c["backend"]
    if num_items is not None:
        kw["num_items_in_batch"] = num_items
    start = o0 if c["start"] == "explicit" else None
    if c["module"]:
        kw.pop("labels")
        nib = kw.pop("num_items_in_batch", None)
        crit = kdkernels.KDLoss(process_group=group, vocab_start_index=start, **kw)
        return crit(s, t, labels, num_items_in_batch=nib)
    return kdkernels.kd_loss(s, t, process_group=group, vocab_start_index=start, **kw)


COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce",
               "broadcast", "reduce_scatter_tensor", "all_to_all_single", "reduce", "gather")


def _count_collectives(c, rank, world):
    """Collectives issued by forward and by backward, per divergence and option set."""
    import torch.distributed as dist
    calls = []
    saved = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return wrapper
    out = {}
    try:
        for n, fn in saved.items():
            setattr(dist, n, counting(n, fn))
        _, student, teacher, labels = make_inputs(c)
        student, teacher = student.to(c["dtype"]), teacher.to(c["dtype"])
        o0, o1 = shard_bounds(SPLITS[world], rank)
        for name in divergences.kernel_names():
            for hw, start in ((0.0, None), (0.5, None), (0.5, o0)):
                s = student[..., o0:o1].detach().requires_grad_(True)
                del calls[:]
                loss = kdkernels.kd_loss(s, teacher[..., o0:o1], name, 2.0, labels,
                                         hard_weight=hw, process_group=dist.group.WORLD,
                                         vocab_start_index=start, backend=c["backend"])
                fwd = len(calls)
                loss.backward()
                out[(name, hw, start is None)] = (fwd, len(calls) - fwd)
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)
    return out


def _refusals(c):
    """Ensembles, teacher gradients and logit_mse with process_group: the error of each."""
    import torch.distributed as dist
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    tries = [dict(divergence="logit_mse"), dict(teacher_logits=[t, t.flip(-1)]),
             dict(teacher_logits=t.clone().requires_grad_(True))]
    out = []
    for kw in tries:
        kw = {"teacher_logits": t, "backend": c["backend"], **kw}
        try:
            kdkernels.kd_loss(s, process_group=dist.group.WORLD, **kw)
            out.append(None)
        except Exception as e:
            out.append((type(e).__name__, str(e)))
    return out


def _run_case(c, rank, world, groups):
    import torch.distributed as dist
    if c["kind"] == "count":
        return {"counts": _count_collectives(c, rank, world)}
    if c["kind"] == "refuse":
        return {"refusals": _refusals(c)}
    base, student, teacher, labels = make_inputs(c)
    if c.get("device") == "cuda":
        base, teacher = base.to(f"cuda:{rank}"), teacher.to(f"cuda:{rank}")
        labels = None if labels is None else labels.to(f"cuda:{rank}")
    leaf = base.clone().requires_grad_(True)
    student = leaf[:, :-1] if c["strided"] else leaf[:, 1:]
    if c["kind"] == "tp":
        splits = c.get("splits") or SPLITS[world]
        loss = _tp_loss(c, student, teacher, labels, dist.group.WORLD, rank, splits)
        cols = shard_bounds(splits, rank)
        rows = slice(None)
    elif c["kind"] == "dp":  # each rank: half of the batch, full vocabulary, no TP
        rows = slice(rank, rank + 1)
        kw = loss_kwargs(c)
        kw["labels"] = labels[rows]
        kw["num_items_in_batch"] = kdkernels.global_num_items(labels[rows])
        loss = kdkernels.kd_loss(student[rows], teacher[rows], **kw)
        cols = (0, V)
    else:  # tp2dp2: TP pairs {0,1}, {2,3}; DP pairs {0,2}, {1,3}
        tp_group, dp_group = groups
        d, t = divmod(rank, 2)
        rows = slice(d, d + 1)
        splits = [17, 20]
        nib = kdkernels.global_num_items(labels[rows], group=dp_group)
        loss = _tp_loss(c, student[rows], teacher[rows], labels[rows], tp_group, t, splits, nib)
        cols = shard_bounds(splits, t)
    loss.sum().backward()
    full = leaf.grad[:, :-1] if c["strided"] else leaf.grad[:, 1:]
    grad = full[rows]
    outside = torch.cat([grad[..., :cols[0]], grad[..., cols[1]:]], -1)
    assert not outside.any(), "gradient leaked outside the local shard"
    return {"loss": loss.detach().cpu(), "grad": grad[..., cols[0]:cols[1]].detach().cpu(),
            "cols": cols}


def _worker(rank, world, port, outdir, backend, suite="main"):
    import torch.distributed as dist
    import kdkernels.backends.reference as kdd  # the row chunks of every PyTorch path
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    kdd.CHUNK_ELEMENTS = 64  # several row chunks per shard: exercises the chunk loops
    cases = CASES
    if backend == "nccl":
        torch.cuda.set_device(rank)
        cases = gpu_cases(world)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    groups = None
    if world == 4 and backend == "gloo":
        tps = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        dps = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        groups = (tps[rank // 2], dps[rank % 2])
    for c in cases:
        if c["world"] != world or c["suite"] != suite or KERNEL_REASONS.get(c["backend"]):
            continue
        try:
            res = _run_case(c, rank, world, groups)
        except Exception as e:  # recorded and reported by the test of this case
            res = {"error": type(e).__name__, "message": str(e), "tb": traceback.format_exc()}
        torch.save(res, os.path.join(outdir, f"{c['id']}.{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@functools.lru_cache(maxsize=None)
def run_group(world, backend="gloo", suite="main"):
    """Spawn ``world`` ranks once, run all their cases of ``suite``; returns the results folder."""
    import torch.multiprocessing as mp
    outdir = tempfile.mkdtemp(prefix=f"kd_dist_{backend}{world}_{suite}_")
    ctx = mp.start_processes(_worker, args=(world, _free_port(), outdir, backend, suite),
                             nprocs=world, join=False, start_method="spawn")
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
    outdir = run_group(c["world"], "nccl" if c.get("device") == "cuda" else "gloo", c["suite"])
    out = []
    for r in range(c["world"]):
        res = torch.load(os.path.join(outdir, f"{c['id']}.{r}.pt"))
        out.append(res)
    return out


# ---- the tests ----------------------------------------------------------------------------

def _oracle(c, student, teacher, labels, **extra):
    kw = dict(divergence_name=c["div"], temperature=c["T"], labels=labels,
              soft_weight=c["sw"], hard_weight=c["hw"], reduction=c["reduction"],
              num_items_in_batch=c["num_items"], **PARAMS.get(c["div"], {}))
    kw.update(extra)
    return oracle.loss_and_grad(student, teacher, **kw)


def _plain(c, student, teacher, labels):
    """Single-process PyTorch (reference backend) in the input dtype: the error yardstick."""
    if c["dtype"] == F64:
        return None, None
    s = student.detach().clone().requires_grad_(True)
    kw = loss_kwargs(c)
    kw["labels"] = labels
    out = kdkernels.kd_loss(s, teacher, backend="reference", **kw)
    out.sum().backward()
    return out.detach(), s.grad


TP_CASES = [c for c in CASES if c["kind"] == "tp" and c["labels"] != "out_of_range"]


@pytest.mark.parametrize("c", TP_CASES, ids=[c["id"] for c in TP_CASES])
def test_vocab_parallel_matches_oracle(c):
    res = results(c)
    for r, x in enumerate(res):
        assert "error" not in x, f"rank {r}: {x.get('tb')}"
    _, student, teacher, labels = make_inputs(c)
    exp_loss, exp_grad = _oracle(c, student, teacher, labels)
    plain_loss, plain_grad = _plain(c, student, teacher, labels)
    for r, x in enumerate(res):  # the loss is replicated: every rank has the same value
        assert torch.equal(x["loss"], res[0]["loss"]), f"rank {r} loss differs from rank 0"
    loss = res[0]["loss"]
    assert loss.dtype == (F64 if c["dtype"] == F64 else F32)
    assert_close(loss, exp_loss.to(loss.dtype), c["dtype"], plain_loss, what="loss")
    grad = torch.cat([x["grad"] for x in res], -1)
    assert grad.dtype == c["dtype"] and grad.shape == student.shape
    assert_close(grad, exp_grad.to(grad.dtype), c["dtype"], plain_grad, what="grad")
    if c["labels"] is not None:
        ignored = labels == -100
        assert not grad[ignored].any(), "ignored rows must get an exactly zero gradient"
    if c["labels"] == "none_counted":
        assert float(loss) == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_nccl_on_cuda_matches_oracle():
    world = min(torch.cuda.device_count(), 4)
    for c in gpu_cases(world):
        test_vocab_parallel_matches_oracle(c)


BAD = [c for c in CASES if c["labels"] == "out_of_range"]


@pytest.mark.parametrize("c", BAD, ids=[c["id"] for c in BAD])
def test_label_outside_global_vocab_raises(c):
    for r, x in enumerate(results(c)):
        assert x.get("error") == "ValueError", f"rank {r}: {x}"
        assert "global vocabulary" in x["message"] and str(V) in x["message"]


def test_data_parallel_halves_equal_one_batch():
    for c in (c for c in CASES if c["kind"] == "dp"):
        res = results(c)
        for r, x in enumerate(res):
            assert "error" not in x, f"{c['id']} rank {r}: {x.get('tb')}"
        _, student, teacher, labels = make_inputs(c)
        exp_loss, exp_grad = _oracle(c, student, teacher, labels)
        # per-rank losses are shares of the global batch: they sum to the one-batch loss
        total = sum(x["loss"] for x in res)
        assert_close(total, exp_loss.to(total.dtype), c["dtype"], _plain(c, student, teacher,
                                                                       labels)[0], what="loss")
        grad = torch.cat([x["grad"] for x in res], 0)
        assert_close(grad, exp_grad.to(grad.dtype), c["dtype"],
                     _plain(c, student, teacher, labels)[1], what="grad")


def test_tensor_and_data_parallel_subgroups():
    c = next(c for c in CASES if c["kind"] == "tp2dp2")
    res = results(c)
    for r, x in enumerate(res):
        assert "error" not in x, f"rank {r}: {x.get('tb')}"
    _, student, teacher, labels = make_inputs(c)
    exp_loss, exp_grad = _oracle(c, student, teacher, labels)
    assert torch.equal(res[0]["loss"], res[1]["loss"]) and torch.equal(res[2]["loss"],
                                                                      res[3]["loss"])
    assert_close(res[0]["loss"] + res[2]["loss"], exp_loss, F64, what="loss")
    grad = torch.cat([torch.cat([res[0]["grad"], res[1]["grad"]], -1),
                      torch.cat([res[2]["grad"], res[3]["grad"]], -1)], 0)
    assert_close(grad, exp_grad, F64, what="grad")


COUNT_CASES = [c for c in CASES if c["kind"] == "count"]


@pytest.mark.parametrize("c", COUNT_CASES, ids=[c["id"] for c in COUNT_CASES])
def test_collectives_per_call_are_as_documented(c):
    """forward/reverse KL: 1 all_gather; others: all_gather + all_reduce; backward: none; the
    hard term with default offsets adds one all_gather of the shard sizes. The same on the
    kernel backends."""
    res = results(c)
    for r, x in enumerate(res):
        assert "error" not in x, f"rank {r}: {x.get('tb')}"
    counts = res[0]["counts"]
    assert len(counts) == 3 * len(divergences.kernel_names())
    for (name, hw, default_start), (fwd, bwd) in counts.items():
        expected = (1 if divergences.get(name).online else 2) + (1 if hw and default_start else 0)
        assert (fwd, bwd) == (expected, 0), (name, hw, default_start, fwd, bwd)


REFUSE_CASES = [c for c in CASES if c["kind"] == "refuse"]


@pytest.mark.parametrize("c", REFUSE_CASES, ids=[c["id"] for c in REFUSE_CASES])
def test_single_process_features_refused_with_process_group(c):
    for r, x in enumerate(results(c)):
        assert "error" not in x, f"rank {r}: {x.get('tb')}"
        for got, what in zip(x["refusals"], ("logit_mse", "ensemble", "teacher_grad")):
            assert got is not None and got[0] == "ValueError", (what, got)
            assert "process_group does not support" in got[1] and what in got[1], got


# ---- single-process checks (no process group needed) ----------------------------------------

def test_global_num_items_without_process_group_is_local_count():
    labels = torch.tensor([[1, -100, 3], [-100, -100, 0]])
    assert int(kdkernels.global_num_items(labels)) == 3
    assert int(kdkernels.global_num_items(labels, ignore_index=0)) == 5
    with pytest.raises(TypeError, match="labels"):
        kdkernels.global_num_items(labels.float())
    with pytest.raises(TypeError, match="labels"):
        kdkernels.global_num_items([1, 2])


def test_auto_picks_a_kernel_backend_with_process_group():
    from kdkernels import backends
    cpu = torch.device("cpu")
    for name in ("cpu", "triton", "cuda", "reference"):
        assert "vocab_parallel" in backends.BACKENDS[name].features
    if backends.availability("cpu") is None:
        assert backends.choose("auto", cpu, F32, frozenset({"vocab_parallel"})) == "cpu"
    assert backends.choose("auto", cpu, F64, frozenset({"vocab_parallel"})) == "reference"


def test_vocab_start_index_needs_process_group():
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    with pytest.raises(ValueError, match="vocab_start_index"):
        kdkernels.kd_loss(s, t, vocab_start_index=0)


def test_process_group_needs_initialised_distributed():
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.fail("this test process must not hold a process group")
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    with pytest.raises(ValueError, match="process_group"):
        kdkernels.kd_loss(s, t, process_group=object())


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_backward_label_outside_the_shard_adds_softmax_only(backend, T):
    """The kernels' backward for a label outside [0, V) that is not ignore_index (on a
    vocab-parallel rank: a label owned by another rank): hard_weight·softmax(s), no one-hot, no
    NaN; the soft term as usual. Below the API (which refuses such labels single-process)."""
    from kdkernels import backends
    reason = KERNEL_REASONS[backend]
    if reason:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")
    mod = backends.load(backend)
    g = torch.Generator().manual_seed(3)
    s = torch.randn(1, 4, 20, generator=g) * 3
    t = torch.randn(1, 4, 20, generator=g) * 3
    labels = torch.tensor([3, 20, 21, -100])  # inside, just outside, outside, ignored
    sw, hw = 0.8, 0.6
    args = (0, 0.0, T, sw, hw, -100)         # forward KL
    _, stats = mod.forward_rows(s, t, labels, *args)
    grad = mod.backward_rows(torch.ones(4), s, t, labels, stats, *args)
    s64, t64 = s.double()[0], t.double()[0]
    q, p = torch.softmax(s64 / T, -1), torch.softmax(t64 / T, -1)
    expected = sw * T * (q - p) + hw * torch.softmax(s64, -1)
    expected[0, 3] -= hw
    expected[3] = 0.0
    assert torch.isfinite(grad).all()
    assert_close(grad[0].double(), expected, torch.float32, what="grad")


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("div", divergences.kernel_names())
def test_forward_rows_given_stats_reproduces_forward(backend, div):
    """The kernel contract's forward_rows_given_stats, given a whole row's own statistics from
    forward_rows (one "shard" = the full vocabulary): Σφ·T² is forward's loss and Σ q·g its c,
    in each backend's own layout and convention; zeros on ignored rows; −inf columns and
    |logits| ≈ 1e4 included."""
    from kdkernels import backends
    reason = KERNEL_REASONS[backend]
    if reason:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")
    mod = backends.load(backend)
    d = divergences.get(div)
    param = d.check_param(PARAMS.get(div, {}).get("beta", PARAMS.get(div, {}).get("alpha")))
    g = torch.Generator().manual_seed(5)
    s = torch.randn(2, 3, 50, generator=g) * 3
    t = torch.randn(2, 3, 50, generator=g) * 3
    s[..., [0, 7]] = float("-inf")
    t[..., [0, 7]] = float("-inf")
    s[1] += 1e4
    t[1] -= 1e4
    labels = torch.tensor([1, -100, 4, 5, 6, -100])
    T = 1.5
    loss, stats = mod.forward_rows(s, t, labels, d.id, param, T, 1.0, 0.0, -100)
    part = mod.forward_rows_given_stats(s, t, labels, stats, d.id, param, T, -100)
    assert part.shape == (6, 2) and part.dtype == torch.float32
    assert not part[labels == -100].any()
    assert_close(part[:, 0] * (T * T), loss, torch.float32, what="sum of phi")
    assert_close(part[:, 1], stats[:, 4], torch.float32, what="c")
