"""Dump a teacher's top-k log-probabilities to disk once, then distill from the files.

``dump_topk(logits, out_dir, k, temperature)`` keeps, per token, the k largest log-probabilities
of softmax(logits / temperature) and their column indices, and writes them as numpy ``.npz``
shards plus ``metadata.json`` (temperature, vocabulary size, k, dtypes, batch shapes).
``load_topk(out_dir)`` yields the batches back, as (indices int64, log-probs) torch tensors with
each input batch's leading shape, ready for ``sparse_kd_loss(student, indices, logprobs,
temperature=<the same temperature>)``.

Storage per token: k · (index bytes + log-prob bytes), e.g. k = 64 with int32 indices and fp16
log-probs is 384 B (+ the .npz container's few hundred bytes per shard), against V · 2 B for dense
bf16 logits (256 512 B for V = 128256). int32 indices suffice for V < 2³¹; fp16 log-probs keep
about 3 decimal digits (relative 2⁻¹¹), enough for renormalize; for tail="bucket" the teacher's
tail 1 − Σ p inherits that rounding, so prefer fp32 there if small tails matter.

Command line: ``python -m kdkernels topk-dump LOGITS OUT_DIR --k 64 --temperature 2`` with LOGITS
a ``.npy`` file (memory-mapped, streamed in batches) or a ``.pt`` file holding a tensor (or a dict;
pick the entry with ``--key``).
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Iterable, Iterator, Tuple, Union

import numpy as np
import torch

__all__ = ["dump_topk", "load_topk", "topk_logprobs", "read_metadata"]

FORMAT = "kdkernels-topk"
VERSION = 1
_INDEX_DTYPES = {"int32": np.int32, "int64": np.int64}
_LOGPROB_DTYPES = {"float16": np.float16, "float32": np.float32}
# rows of fp32 log-softmax work per step (bounds the memory of a [rows, V] temporary)
_ROW_ELEMENTS = 1 << 24


def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0):
    """(log-probs [..., k] fp32, indices [..., k] int64) of the k largest entries of
    log_softmax(logits / temperature), computed in fp32 over chunks of rows, sorted descending."""
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    vals, idxs = [], []
    step = max(1, _ROW_ELEMENTS // max(V, 1))
    for r0 in range(0, x.shape[0], step):
        lp = torch.log_softmax(x[r0:r0 + step].float() / temperature, dim=-1)
        v, i = lp.topk(k, dim=-1)
        vals.append(v)
        idxs.append(i)
    if not vals:
        return (torch.empty(*logits.shape[:-1], k), torch.empty(*logits.shape[:-1], k,
                                                                dtype=torch.int64))
    lead = logits.shape[:-1]
    return torch.cat(vals).view(*lead, k), torch.cat(idxs).view(*lead, k)


def _as_tensor(batch, what: str) -> torch.Tensor:
    if isinstance(batch, np.ndarray):
        batch = np.ascontiguousarray(batch)
        batch = torch.from_numpy(batch if batch.flags.writeable else batch.copy())
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor or numpy array of logits [..., V], got "
                        f"{type(batch).__name__}")
    if not batch.is_floating_point():
        raise TypeError(f"{what} must hold floating-point logits, got dtype {batch.dtype}")
    if batch.dim() < 1:
        raise ValueError(f"{what} must have shape [..., V], got a scalar")
    return batch.detach()


def _batches(src) -> Iterator[torch.Tensor]:
    if isinstance(src, (torch.Tensor, np.ndarray)):
        yield _as_tensor(src, "logits")
        return
    if callable(src):
        src = src()
    if not isinstance(src, Iterable):
        raise TypeError("logits_or_iterable must be a tensor, an iterable of tensors, or a callable "
                        f"returning one; got {type(src).__name__}")
    for i, b in enumerate(src):
        yield _as_tensor(b, f"batch {i}")


class _ShardWriter:
    def __init__(self, out_dir, k, shard_size, idx_dt, lp_dt):
        self.out_dir, self.k, self.shard_size = out_dir, k, shard_size
        self.idx_dt, self.lp_dt = idx_dt, lp_dt
        self.buf_i, self.buf_p, self.buffered = [], [], 0
        self.shards = []

    def add(self, idx: np.ndarray, lp: np.ndarray) -> None:
        while len(idx):
            take = min(len(idx), self.shard_size - self.buffered)
            self.buf_i.append(idx[:take])
            self.buf_p.append(lp[:take])
            self.buffered += take
            idx, lp = idx[take:], lp[take:]
            if self.buffered == self.shard_size:
                self.flush()

    def flush(self) -> None:
        if not self.buffered:
            return
        name = f"shard-{len(self.shards):05d}.npz"
        np.savez(os.path.join(self.out_dir, name),
                 indices=np.concatenate(self.buf_i).astype(self.idx_dt, copy=False),
                 logprobs=np.concatenate(self.buf_p).astype(self.lp_dt, copy=False))
        self.shards.append({"file": name, "tokens": self.buffered})
        self.buf_i, self.buf_p, self.buffered = [], [], 0


def dump_topk(logits_or_iterable: Union[torch.Tensor, np.ndarray, Iterable, Callable],
              out_dir: Union[str, os.PathLike], k: int, temperature: float = 1.0, *,
              shard_size: int = 1 << 20, index_dtype: str = "int32",
              logprob_dtype: str = "float16", overwrite: bool = False) -> dict:
    """Write the top-``k`` tempered teacher log-probabilities of every token under ``out_dir``.

    Args:
        logits_or_iterable: teacher logits [..., V] (tensor or numpy array), or an iterable of
            such batches, or a callable returning that iterable (e.g. a generator function that
            runs the teacher batch by batch). Every batch must have the same V.
        out_dir: directory to create (it must be empty or absent unless ``overwrite``).
        k: entries kept per token, 1 <= k <= V.
        temperature: T > 0; the stored values are log_softmax(logits / T), the teacher side of
            ``sparse_kd_loss(..., temperature=T)``.
        shard_size: tokens per ``.npz`` shard.
        index_dtype: "int32" (default) or "int64".
        logprob_dtype: "float16" (default) or "float32".

    Returns:
        The metadata written to ``out_dir/metadata.json``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if index_dtype not in _INDEX_DTYPES:
        raise ValueError(f"index_dtype must be one of {list(_INDEX_DTYPES)}, got {index_dtype!r}")
    if logprob_dtype not in _LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype must be one of {list(_LOGPROB_DTYPES)}, got "
                         f"{logprob_dtype!r}")
    out_dir = os.fspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"out_dir {out_dir!r} is not empty (pass overwrite=True)")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # overwrite: remove our own files only
        if name == "metadata.json" or (name.startswith("shard-") and name.endswith(".npz")):
            os.remove(os.path.join(out_dir, name))

    writer = _ShardWriter(out_dir, k, shard_size, _INDEX_DTYPES[index_dtype],
                          _LOGPROB_DTYPES[logprob_dtype])
    V = None
    src_dtype = None
    batch_shapes = []
    for i, batch in enumerate(_batches(logits_or_iterable)):
        if V is None:
            V, src_dtype = batch.shape[-1], str(batch.dtype).replace("torch.", "")
            if k > V:
                raise ValueError(f"k={k} exceeds the vocabulary size V={V}")
            if index_dtype == "int32" and V > np.iinfo(np.int32).max:
                raise ValueError("V does not fit int32 indices; use index_dtype='int64'")
        elif batch.shape[-1] != V:
            raise ValueError(f"batch {i} has vocabulary size {batch.shape[-1]}, expected {V}")
        lp, idx = topk_logprobs(batch, k, temperature)
        batch_shapes.append(list(batch.shape[:-1]))
        writer.add(idx.reshape(-1, k).cpu().numpy(), lp.reshape(-1, k).cpu().numpy())
    writer.flush()
    if V is None:
        raise ValueError("logits_or_iterable yielded no batch")
    per_token = k * (np.dtype(_INDEX_DTYPES[index_dtype]).itemsize
                     + np.dtype(_LOGPROB_DTYPES[logprob_dtype]).itemsize)
    meta = {
        "format": FORMAT, "version": VERSION, "k": k, "temperature": float(temperature),
        "vocab_size": V, "index_dtype": index_dtype, "logprob_dtype": logprob_dtype,
        "source_dtype": src_dtype, "num_tokens": sum(s["tokens"] for s in writer.shards),
        "bytes_per_token": per_token, "batch_shapes": batch_shapes, "shards": writer.shards,
    }
    with open(os.path.join(out_dir, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def read_metadata(out_dir: Union[str, os.PathLike]) -> dict:
    path = os.path.join(os.fspath(out_dir), "metadata.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a directory written by dump_topk")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} metadata file")
    return meta


def load_topk(out_dir: Union[str, os.PathLike], *, batch_shapes: bool = True
              ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Yield (indices int64, logprobs in the stored dtype) torch tensors batch by batch.

    With ``batch_shapes=True`` each yielded pair has the leading shape of the corresponding input
    batch ([..., k]); with False, one [tokens, k] pair per shard. Read the temperature and the
    vocabulary size with ``read_metadata(out_dir)``.
    """
    meta = read_metadata(out_dir)
    k = meta["k"]

    def shards():
        for sh in meta["shards"]:
            with np.load(os.path.join(os.fspath(out_dir), sh["file"])) as z:
                idx, lp = z["indices"], z["logprobs"]
            if idx.shape != (sh["tokens"], k) or lp.shape != idx.shape:
                raise ValueError(f"shard {sh['file']} has shape {idx.shape}, expected "
                                 f"({sh['tokens']}, {k})")
            yield idx, lp

    if not batch_shapes:
        for idx, lp in shards():
            yield torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(lp)
        return
    it = shards()
    pend_i, pend_p, have = [], [], 0
    for shape in meta["batch_shapes"]:
        need = math.prod(shape)
        while have < need:
            i, p = next(it)
            pend_i.append(i)
            pend_p.append(p)
            have += len(i)
        idx = np.concatenate(pend_i) if pend_i else np.empty((0, k), np.int64)
        lp = np.concatenate(pend_p) if pend_p else np.empty((0, k), meta["logprob_dtype"])
        yield (torch.from_numpy(idx[:need].astype(np.int64)).view(*shape, k),
               torch.from_numpy(np.ascontiguousarray(lp[:need])).view(*shape, k))
        pend_i, pend_p, have = [idx[need:]], [lp[need:]], len(idx) - need


# ---- command line: python -m kdkernels topk-dump ----------------------------------------

def add_topk_dump_arguments(p) -> None:
    p.add_argument("logits", help="teacher logits [..., V]: a .npy file (memory-mapped) or a .pt "
                                  "file holding a tensor or a dict of tensors")
    p.add_argument("out_dir", help="output directory (shards + metadata.json)")
    p.add_argument("--k", type=int, default=64, help="entries kept per token (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--key", default=None, help="entry of a .pt dict holding the logits")
    p.add_argument("--shard-size", type=int, default=1 << 20, help="tokens per shard")
    p.add_argument("--batch-rows", type=int, default=4096, help="rows read per step (.npy)")
    p.add_argument("--index-dtype", default="int32", choices=list(_INDEX_DTYPES))
    p.add_argument("--logprob-dtype", default="float16", choices=list(_LOGPROB_DTYPES))
    p.add_argument("--overwrite", action="store_true", help="replace an earlier dump in out_dir")


def run_topk_dump(args) -> int:
    path = args.logits
    if path.endswith(".npy"):
        arr = np.load(path, mmap_mode="r")
        if arr.ndim < 1:
            raise SystemExit(f"{path}: expected an array [..., V], got a scalar")
        lead = arr.shape[:-1]
        rows = arr.reshape(-1, arr.shape[-1])

        def source():  # stream rows; batches are then [rows, V] chunks of the flattened array
            for r0 in range(0, rows.shape[0], args.batch_rows):
                yield np.array(rows[r0:r0 + args.batch_rows])  # a copy: memmap pages are read-only
    elif path.endswith((".pt", ".pth")):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict):
            if args.key is None or args.key not in obj:
                raise SystemExit(f"{path} holds a dict with keys {sorted(obj)}; pick one with --key")
            obj = obj[args.key]
        if not isinstance(obj, torch.Tensor):
            raise SystemExit(f"{path} does not hold a tensor (got {type(obj).__name__})")
        lead = obj.shape[:-1]

        def source():
            yield obj
    else:
        raise SystemExit(f"{path}: expected a .npy or .pt file")
    meta = dump_topk(source, args.out_dir, args.k, args.temperature, shard_size=args.shard_size,
                     index_dtype=args.index_dtype, logprob_dtype=args.logprob_dtype,
                     overwrite=args.overwrite)
    files = [os.path.join(args.out_dir, s["file"]) for s in meta["shards"]]
    on_disk = sum(os.path.getsize(f) for f in files)
    V, n = meta["vocab_size"], max(meta["num_tokens"], 1)
    print(f"wrote {meta['num_tokens']} tokens (input shape {tuple(lead)} x {V}) in {len(files)} "
          f"shard(s) to {args.out_dir}")
    print(f"k={meta['k']} T={meta['temperature']:g} indices {meta['index_dtype']}, log-probs "
          f"{meta['logprob_dtype']}: {meta['bytes_per_token']} B/token of payload, "
          f"{on_disk / n:.1f} B/token on disk; dense bf16 logits: {2 * V} B/token "
          f"({2 * V / meta['bytes_per_token']:.0f}x more)")
    return 0
