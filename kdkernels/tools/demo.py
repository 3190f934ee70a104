"""``python -m kdkernels demo``: distil a small student language model from a larger teacher on
the CPU, with no downloads, and compare the naive eager loss against ``kdkernels.kd_loss``.

What it does, in order:

1. Data. By default a synthetic language is generated from a seed: ``--vocab`` made-up words
   with Zipf-distributed frequencies, where each word has a few likely successors (a sparse
   bigram process mixed with the Zipf background). The text is written out, then read back
   through a small word-level tokenizer (``WordTokenizer``): most frequent words first, ``<unk>``
   for the rest. ``--corpus FILE`` uses your own text file instead.
2. Teacher. A GPT-style transformer (``TinyGPT``, plain ``torch.nn``) is trained briefly with
   cross-entropy on the corpus, so that its next-token distributions carry real information
   (a random teacher would only teach noise).
3. Students. Two copies of one smaller ``TinyGPT`` (same initial weights, same optimiser
   settings, same batches, same teacher logits) are trained side by side, one with the naive
   eager loss (``kdkernels.tools.eager.eager_kd_loss``, the formula on full [N, V] tensors) and one
   with ``kdkernels.kd_loss`` (backend "auto"). Their loss curves must agree within
   ``--rtol`` of the curve's scale (its first value): two fp32 training runs that differ only in
   rounding drift apart slowly as the weights diverge, so the difference at each step is compared
   with the size of the loss being optimised, not with the (tiny) late loss itself; the first
   step, same weights and inputs, must agree to rounding. The loss call (forward + backward of the loss alone, logits detached) is timed
   on every step, alternately, in this one process.
4. Memory. The peak extra memory of one loss forward + backward at the demo's shape is measured
   for each method in a fresh subprocess: the child allocates the logits, resets the kernel's
   peak-RSS counter (``/proc/self/clear_refs``), runs the loss and its backward, and reports the
   peak RSS (``VmHWM``) minus the RSS just before the call. This counts every byte the loss
   touches (its buffers and the gradient it returns), independent of PyTorch's allocator.

Output: a progress bar, a final table, ``curves.png`` (both curves and their relative
difference) and ``curves.csv`` in ``--out``. matplotlib is optional (the ``demo`` extra): without
it the demo says so before it starts, writes the table and ``curves.csv``, and exits 0.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .memory_probe import proc_status_kib

__all__ = ["WordTokenizer", "TinyGPT", "synthetic_text", "run_demo", "add_demo_arguments",
           "loss_call_memory"]


# ---- data -----------------------------------------------------------------------------------

_ONSETS = ["", "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "st", "tr",
           "pl", "kr", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]


def _word(i: int) -> str:
    """A unique pronounceable word for index i (base-160 syllables)."""
    syl = []
    n = i
    while True:
        n, r = divmod(n, len(_ONSETS) * len(_VOWELS))
        syl.append(_ONSETS[r // len(_VOWELS)] + _VOWELS[r % len(_VOWELS)])
        if n == 0:
            break
        n -= 1
    return "".join(reversed(syl))


def lexicon(n: int) -> List[str]:
    """``n`` distinct made-up words (``_word`` can spell one word two ways, e.g. "a"+"i" = "ai")."""
    out, seen, i = [], set(), 0
    while len(out) < n:
        w = _word(i)
        i += 1
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def synthetic_text(n_words: int, n_tokens: int, seed: int = 0, successors: int = 4,
                   follow: float = 0.8) -> str:
    """Text of ``n_tokens`` words over a lexicon of ``n_words`` made-up words.

    Each word has ``successors`` preferred next words (weights ∝ 1/rank); with probability
    ``follow`` the next word is one of them, otherwise a draw from the Zipf(1) background.
    A newline follows every 16th word, for readability only.
    """
    if n_words < 2 or n_tokens < 2:
        raise ValueError(f"n_words and n_tokens must be >= 2, got {n_words}, {n_tokens}")
    g = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, n_words + 1, dtype=torch.float64)
    zipf /= zipf.sum()
    succ = torch.multinomial(zipf.float().expand(n_words, n_words), successors, replacement=False,
                             generator=g)                                         # [n_words, k]
    w = 1.0 / torch.arange(1, successors + 1, dtype=torch.float64)
    pick = torch.multinomial(w.float(), n_tokens, replacement=True, generator=g).tolist()
    background = torch.multinomial(zipf.float(), n_tokens, replacement=True, generator=g).tolist()
    coin = (torch.rand(n_tokens, generator=g) < follow).tolist()
    succ = succ.tolist()
    words = lexicon(n_words)
    cur = background[0]
    out = []
    for i in range(n_tokens):
        out.append(words[cur])
        out.append("\n" if i % 16 == 15 else " ")
        cur = succ[cur][pick[i]] if coin[i] else background[i]
    return "".join(out)


class WordTokenizer:
    """Whitespace word tokenizer: the ``vocab_size - 1`` most frequent words, plus ``<unk>``."""

    UNK = "<unk>"

    def __init__(self, words: List[str]):
        self.itos = [self.UNK] + [w for w in words if w != self.UNK]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def from_text(cls, text: str, vocab_size: int, lexicon=()) -> "WordTokenizer":
        """Most frequent words of ``text`` first; then words of ``lexicon`` not seen in the text
        (a known word list keeps the vocabulary at ``vocab_size`` however short the text)."""
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        counts = Counter(text.split())
        ordered = sorted(counts, key=lambda w: (-counts[w], w))  # ties broken by spelling
        ordered += [w for w in lexicon if w not in counts]
        return cls(ordered[:vocab_size - 1])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.stoi.get(w, 0) for w in text.split()], dtype=torch.int64)

    def decode(self, ids) -> str:
        return " ".join(self.itos[int(i)] for i in ids)


# ---- model ----------------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, D // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A small pre-norm GPT: token + position embeddings, causal attention blocks, lm_head."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, context: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def hidden(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.norm(x)

    def forward(self, idx):
        return self.lm_head(self.hidden(idx))


def _batches(tokens: torch.Tensor, batch: int, context: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, tokens.numel() - context - 1, (batch,), generator=g)
        win = torch.stack([tokens[s:s + context + 1] for s in start.tolist()])
        yield win[:, :-1], win[:, 1:]


# ---- memory of one loss call, in a fresh process -----------------------------------------------

def child_memory(method: str, rows: int, vocab: int, divergence: str, temperature: float,
                  threads: int) -> Dict[str, float]:
    """Runs inside the subprocess: peak extra RSS of one loss forward + backward."""
    torch.set_num_threads(threads)
    from .. import kd_loss
    from .eager import eager_kd_loss
    g = torch.Generator().manual_seed(0)
    s = torch.randn(rows, vocab, generator=g).mul_(3).requires_grad_(True)
    t = torch.randn(rows, vocab, generator=g).mul_(3)
    fn = eager_kd_loss if method == "eager" else kd_loss
    # warm-up on 2 separate rows (lazy imports, kernels), touching no [rows, vocab] buffer
    fn(torch.randn(2, vocab, requires_grad=True), torch.randn(2, vocab), divergence,
       temperature).backward()
    before = proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")
    hwm0 = proc_status_kib("VmHWM")
    loss = fn(s, t, divergence, temperature)
    loss.backward()
    peak = proc_status_kib("VmHWM")
    return {"extra_mib": (peak - before) / 1024.0, "reset_ok": float(hwm0 <= before + 1024),
            "loss": float(loss)}


def loss_call_memory(method: str, rows: int, vocab: int, divergence: str = "forward_kl",
                     temperature: float = 1.0, threads: int = 2) -> Optional[Dict[str, float]]:
    """Peak extra memory (MiB) of one fp32 loss forward + backward on [rows, vocab] logits, in a
    fresh Python process; ``method`` is "eager" or "kdkernels". None where /proc is missing."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import json, kdkernels.tools.demo as d; print(json.dumps(d.child_memory("
            f"{method!r}, {rows}, {vocab}, {divergence!r}, {temperature!r}, {threads})))")
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe for {method} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the demo -------------------------------------------------------------------------------

def add_demo_arguments(p) -> None:
    p.add_argument("--steps", type=int, default=120, help="student training steps (default 120)")
    p.add_argument("--teacher-steps", type=int, default=100,
                   help="teacher pre-training steps with cross-entropy (default 100)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size (default 4096)")
    p.add_argument("--tokens", type=int, default=100_000,
                   help="length of the generated corpus in words (default 100000)")
    p.add_argument("--corpus", default=None, help="a text file to use instead of generated text")
    p.add_argument("--batch", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--context", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--teacher-dim", type=int, default=128)
    p.add_argument("--teacher-layers", type=int, default=3)
    p.add_argument("--student-dim", type=int, default=64)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--divergence", default="forward_kl")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--hard-weight", type=float, default=0.0,
                   help="weight of the hard-label cross-entropy (default 0: pure distillation)")
    p.add_argument("--rtol", type=float, default=1e-3,
                   help="largest difference allowed between the two loss curves, relative to "
                        "the first step's loss")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="kd_demo", help="output folder for curves.png/csv")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fmt_table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _plot(path: str, eager: List[float], fused: List[float], label: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(range(1, len(eager) + 1))
    rel = [abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager, fused)]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax1.plot(steps, eager, label="eager (naive PyTorch)", lw=2.5, alpha=0.6)
    ax1.plot(steps, fused, label=f"kdkernels.kd_loss ({label})", lw=1.0, ls="--")
    ax1.set_ylabel("distillation loss")
    ax1.set_title("Two identical students, same batches")
    ax1.legend()
    ax2.semilogy(steps, [max(r, 1e-12) for r in rel])
    ax2.set_ylabel("relative difference")
    ax2.set_title("|eager − kdkernels| / eager (exact zeros drawn at 1e-12)", fontsize=9)
    ax2.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


PLOT_HINT = ("pip install matplotlib (or the demo extra: pip install \"kdkernels[demo]\") and rerun "
             "for curves.png; curves.csv has the same curves")


def have_matplotlib() -> bool:
    """Whether the optional plotting dependency imports (checked before any work is done)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def run_demo(args) -> int:
    from .progress import progress

    from .. import backends, kd_loss
    from .eager import eager_kd_loss

    for name in ("steps", "vocab", "batch", "context", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    plot = have_matplotlib()
    if not plot:
        print(f"note: matplotlib is not installed, so the demo writes the table and curves.csv but "
              f"no curves.png; {PLOT_HINT}.")

    # 1. data
    if args.corpus:
        with open(args.corpus, encoding="utf-8") as f:
            text = f.read()
        source = args.corpus
    else:
        text = synthetic_text(args.vocab - 1, args.tokens, seed=args.seed)
        source = f"generated ({args.tokens} words)"
    words = [] if args.corpus else lexicon(args.vocab - 1)
    tok = WordTokenizer.from_text(text, args.vocab, words)
    ids = tok.encode(text)
    if ids.numel() < args.context + 2:
        raise ValueError(f"the corpus has {ids.numel()} tokens, fewer than --context + 2")
    V = len(tok)
    print(f"corpus: {source}; {ids.numel()} tokens; vocabulary {V} words "
          f"(e.g. {tok.decode(ids[:8])!r})")

    # 2. teacher
    ctx = args.context
    teacher = TinyGPT(V, args.teacher_dim, args.teacher_layers, max(1, args.teacher_dim // 32), ctx)
    opt = torch.optim.AdamW(teacher.parameters(), lr=args.lr)
    bar = progress(_batches(ids, args.batch, ctx, args.teacher_steps, args.seed + 1),
               total=args.teacher_steps, desc="teacher (CE)", disable=args.no_progress)
    teacher_ce = float("nan")
    for x, y in bar:
        loss = F.cross_entropy(teacher(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        teacher_ce = float(loss.detach())
        bar.set_postfix(ce=f"{teacher_ce:.3f}")
    teacher.eval().requires_grad_(False)

    # 3. students
    student = TinyGPT(V, args.student_dim, args.student_layers, max(1, args.student_dim // 32), ctx)
    students = {"eager": student, "kdkernels": copy.deepcopy(student)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr) for k, m in students.items()}
    backend = backends.choose("auto", torch.device("cpu"), torch.float32)
    opts_kw = dict(divergence=args.divergence, temperature=args.temperature,
                   hard_weight=args.hard_weight)
    losses_fns = {
        "eager": lambda s, t, y: eager_kd_loss(s, t, labels=y, **opts_kw),
        "kdkernels": lambda s, t, y: kd_loss(s, t, labels=y, **opts_kw),
    }
    curves = {k: [] for k in students}
    loss_times = {k: [] for k in students}
    step_times = {k: [] for k in students}
    bar = progress(_batches(ids, args.batch, ctx, args.steps, args.seed + 2), total=args.steps,
               desc="students (KD)", disable=args.no_progress)
    for i, (x, y) in enumerate(bar):
        with torch.no_grad():
            t_logits = teacher(x)
        order = list(students) if i % 2 == 0 else list(reversed(students))  # alternate who's first
        for k in order:
            t0 = time.perf_counter()
            logits = students[k](x)
            leaf = logits.detach().requires_grad_(True)       # time the loss call on its own
            t1 = time.perf_counter()
            loss = losses_fns[k](leaf, t_logits, y)
            loss.backward()
            t2 = time.perf_counter()
            logits.backward(leaf.grad)
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            curves[k].append(float(loss.detach()))
            loss_times[k].append(t2 - t1)
            step_times[k].append((t3 - t0) - (t2 - t1))
        rel = abs(curves["eager"][-1] - curves["kdkernels"][-1]) / max(abs(curves["eager"][0]), 1e-12)
        bar.set_postfix(loss=f"{curves['kdkernels'][-1]:.3f}", rel_diff=f"{rel:.1e}")

    scale = max(abs(curves["eager"][0]), 1e-12)
    rel_diffs = [abs(a - b) / scale for a, b in zip(curves["eager"], curves["kdkernels"])]
    worst = max(rel_diffs)
    agree = worst <= args.rtol

    # 4. memory of one loss call at this shape, each in a fresh process
    N = args.batch * ctx
    mem = {}
    if not args.no_memory:
        for k in students:
            mem[k] = loss_call_memory(k, N, V, args.divergence, args.temperature, args.threads)

    # report
    with open(os.path.join(args.out, "curves.csv"), "w") as f:
        f.write("step,eager,kdkernels,diff_over_first_loss\n")
        for j, (a, b, r) in enumerate(zip(curves["eager"], curves["kdkernels"], rel_diffs), 1):
            f.write(f"{j},{a:.9g},{b:.9g},{r:.3e}\n")
    png = os.path.join(args.out, "curves.png")
    if plot:
        _plot(png, curves["eager"], curves["kdkernels"], f"backend {backend}")

    def med_ms(v):
        return 1e3 * statistics.median(v)

    def mib(k):
        m = mem.get(k)
        return "-" if not m else f"{m['extra_mib']:.1f}"

    table = [["method", "final loss", "loss fwd+bwd ms (median)", "rest of step ms (median)",
              "loss peak extra MiB"]]
    names = {"eager": "eager (naive PyTorch)", "kdkernels": f"kdkernels.kd_loss ({backend})"}
    for k in students:
        table.append([names[k], f"{curves[k][-1]:.4f}", f"{med_ms(loss_times[k]):.1f}",
                      f"{med_ms(step_times[k]):.1f}", mib(k)])
    print()
    print(f"teacher: {args.teacher_layers} layers × {args.teacher_dim}, {args.teacher_steps} CE steps, "
          f"final CE {teacher_ce:.3f}; students: {args.student_layers} layers × {args.student_dim}, "
          f"{args.steps} steps; N = {args.batch}×{ctx} = {N} tokens per step, V = {V}, "
          f"{args.divergence}, T = {args.temperature}, {args.threads} threads")
    print(_fmt_table(table))
    ratio_t = med_ms(loss_times["eager"]) / med_ms(loss_times["kdkernels"])
    print(f"loss call time: eager / kdkernels = {ratio_t:.2f}×", end="")
    if mem.get("eager") and mem.get("kdkernels"):
        ratio_m = mem["eager"]["extra_mib"] / max(mem["kdkernels"]["extra_mib"], 1e-9)
        print(f"; peak extra memory: eager / kdkernels = {ratio_m:.2f}× "
              f"(logits [N, V] fp32 = {N * V * 4 / 2**20:.1f} MiB)")
    else:
        print()
    first = abs(curves["eager"][0] - curves["kdkernels"][0]) / scale
    print(f"loss curves: first step relative difference {first:.1e}; max difference over "
          f"{args.steps} steps {worst:.2e} of the first step's loss "
          f"({'within' if agree else 'OUTSIDE'} --rtol {args.rtol:g})")
    csv_path = os.path.join(args.out, "curves.csv")
    wrote = f"{png} and {csv_path}" if plot else csv_path
    print(f"wrote {wrote} in {time.perf_counter() - t_start:.0f} s")
    if not plot:
        print(f"note: no curves.png (matplotlib is not installed): {PLOT_HINT}.")
    return 0 if agree else 1


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser()
    add_demo_arguments(ap)
    sys.exit(run_demo(ap.parse_args()))
