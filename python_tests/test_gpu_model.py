"""benchmarks/gpu_model.py: the SASS counter on known code, and that every variant is found.

The counter is checked on a hand-written SASS listing (exact counts) and on a trivial Triton copy
loop compiled for sm_90a (one 16-byte load and one 16-byte store per 8 bf16 elements: 4 global
bytes per element, no MUFU, no barrier, no shuffle). The launches a training step records are
checked for every divergence, dtype and label mode (no compile: cheap), and one real variant is
compiled and analysed. Compiling runs in a child process without TRITON_INTERPRET (the conftest
sets it for the interpreter tests). CI cost: ~20-40 s.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_model as G  # noqa: E402

SASS = """
        code for sm_90a
                Function : toy
        .headerflags    @"EF_CUDA_TEXMODE_UNIFIED"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_TID.X ;                     /* 0x0000000000007919 */
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;       /* 0x0000000402047981 */
        /*0030*/                   MUFU.EX2 R5, R5 ;                      /* 0x0000000500057308 */
        /*0040*/                   SHFL.BFLY PT, R6, R5, 0x1, 0x1f ;      /* 0x0c201f0005067f89 */
        /*0050*/              @!P0 BRA 0x70 ;                             /* 0x0000000000008947 */
        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;          /* 0x0000000000007b1d */
        /*0070*/                   STG.E.128 desc[UR4][R2.64], R4 ;       /* 0x0000000602007986 */
        /*0080*/                   NOP ;                                  /* 0x0000000000007918 */
        /*0090*/              @P1 BRA 0x20 ;                              /* 0x0000000000001947 */
        /*00a0*/                   EXIT ;                                 /* 0x000000000000794d */
        /*00b0*/                   BRA 0xb0;                              /* 0xfffffffc00fc7947 */
"""


def test_sass_counter_on_known_listing():
    funcs = G.parse_sass(SASS)
    assert list(funcs) == ["toy"]
    ins = funcs["toy"]
    assert len(ins) == 12
    loops = G.top_level_loops(G.find_loops(ins))
    assert loops == [(2, 9)]  # 0x20 .. the back edge at 0x90; the self-loop after EXIT is none
    c = G.count(ins[2:10])
    assert (c.sass, c.mufu, c.shfl, c.bar, c.ldg_bytes, c.stg_bytes, c.branches) == \
        (7, 1, 1, 1, 16, 16, 1)  # the NOP is not counted
    # path search: the branch around the barrier gives a short and a long path, one load and
    # one store each
    ext = G.path_extremes(ins, 2, 9)
    assert list(ext) == [(1, 1, 0)]  # (vector loads, vector stores, 16-byte shared loads)
    short, long_ = ext[(1, 1, 0)]
    assert (short.sass, short.bar, long_.sass, long_.bar) == (6, 0, 7, 1)


REST_SASS = """
                Function : rest
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/              @P0 BRA 0x50 ;
        /*0020*/                   MOV R1, R0 ;
        /*0030*/                   STG.E desc[UR4][R2.64], R1 ;
        /*0040*/                   EXIT ;
        /*0050*/                   CALL.REL.NOINC 0xe0 ;
        /*0060*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0070*/                   FADD R4, R4, R5 ;
        /*0080*/              @P1 BRA 0x60 ;
        /*0090*/                   MUFU.EX2 R5, R4 ;
        /*00a0*/              @P2 BRA 0xc0 ;
        /*00b0*/                   FMUL R5, R5, R5 ;
        /*00c0*/                   STG.E desc[UR4][R2.64], R5 ;
        /*00d0*/                   EXIT ;
        /*00e0*/                   IMAD R6, R6, R7, RZ ;
        /*00f0*/                   IADD3 R6, R6, 0x1, RZ ;
        /*0100*/                   RET.REL.NODEC R8 0x0 ;
        /*0110*/                   BRA 0x110;
"""


@pytest.mark.parametrize("args,named", [
    (["--divs", "kl"], "--divs: kl not among forward_kl"),
    (["--divs", "9"], "--divs: 9 not among"),
    (["--caps", "70"], "--caps: 70 not among 90, 80"),
    (["--dtypes", "bf16,int8"], "--dtypes: int8 not among"),
    (["--modes", ""], "--modes: nothing not among"),
])
def test_cli_rejects_unknown_choices_naming_the_flag(args, named, capsys):
    with pytest.raises(SystemExit) as e:
        G.main(args + ["--json"])
    assert e.value.code == 2
    assert named in capsys.readouterr().err


def test_cli_takes_divergence_names_and_ids():
    ap = G.argparse.ArgumentParser()
    assert G._choices(ap, "--divs", "reverse_kl, 1,tvd", G.DIV_CHOICES, G._div_id) == [1, 5]


def test_straight_line_longest_path():
    """The rest of a kernel: the longest entry-to-EXIT path with the pass loops cut out, exclusive
    branches not summed, a CALL counting its subroutine once."""
    (ins,) = G.parse_sass(REST_SASS).values()
    loops = G.top_level_loops(G.find_loops(ins))
    assert loops == [(6, 8)]
    c = G.straight_line_longest(ins, loops)
    # S2R, BRA, CALL (+ IMAD, IADD3, RET), [loop cut], MUFU, BRA, FMUL, STG, EXIT: the long exit;
    # the short one (MOV, STG, EXIT: 5) and the loop's 3 instructions are not counted
    assert (c.sass, c.mufu, c.ldg_bytes, c.stg_bytes) == (11, 1, 0, 4)
    # with the loop not cut, its body counts once on the way through
    c2 = G.straight_line_longest(ins, [])
    assert (c2.sass, c2.ldg_bytes) == (14, 16)
    # the whole non-loop code counted (the old upper bound) is larger: both exits, the subroutine
    assert G.count(ins).sass - G.count(ins[6:9]).sass == 15


def test_res_usage_parser():
    text = (" Function kd_fwd_kernel:\n  REG:64 STACK:0 SHARED:1024 LOCAL:8 CONSTANT[0]:632\n")
    assert G.parse_res_usage(text) == {"kd_fwd_kernel": {"REG": 64, "STACK": 0, "SHARED": 1024,
                                                         "LOCAL": 8}}


def test_ptx_loop_bytes():
    ptx = """
$L__BB0_1:
	@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	ld.global.b16 %rs1, [ %rd2 + 0 ];
	@%p2 st.global.v2.b32 [ %rd3 + 0 ], { %r1, %r2 };
	@%p3 bra $L__BB0_1;
	bra.uni $L__BB0_2;
$L__BB0_2:
	ret;
"""
    assert G.ptx_loop_bytes(ptx) == [16 + 2 + 8]


_CHILD = r"""
import json, sys
sys.path.insert(0, {bench!r})
import triton, triton.language as tl
import gpu_model as G

@triton.jit
def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * n
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row + cols, mask=cols < n)
        tl.store(y_ptr + row + cols, x, mask=cols < n)

import torch
x = torch.empty(16, dtype=torch.bfloat16)
ln = G.Launch("copy_kernel", copy_kernel, (x, x, 4096), dict(BLOCK=1024, num_warps=4))
c = G.compile_launch(ln, 90)
(name, ins), = G.parse_sass(c["sass"]).items()
unroll = G.loop_unrolls(name, ins, c["ptx_loop_bytes"])
rows = G.analyse_kernel(name, ins, 128, [1024 * unroll[0]], [4096], 1, {{}}, 0)
print(json.dumps(dict(rows=rows, ptx=c["ptx_loop_bytes"], unroll=unroll)))

# one real variant end to end: forward KL, bf16, sm_90a, labels + hard term
v = G.triton_variants(caps=[90], dtypes=["bf16"], divs=[0], modes=["hard"], sparse=False)
print(json.dumps(G.model_triton(v, workers=1)))

# the math intrinsics of the fused training kernels (the interpreter runs tl.log and / instead)
ops = {{}}
for div in (0, 2, 3, 4, 5):
    ln = G.record_launches(G.dense_training_step(div, "bf16", "labels"), 90)[0]
    ptx = G.compile_launch(ln, 90)["ptx"]
    ops[G.DIV_NAMES[div]] = {{k: ptx.count(k) for k in (
        "lg2.approx.ftz.f32", "div.approx.ftz.f32", "div.full.f32", "div.rn.f32",
        "ex2.approx.ftz.f32", "ex2.approx.f32")}}
print(json.dumps(ops))
"""


@pytest.fixture(scope="module")
def child(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    script = tmp_path_factory.mktemp("gpu_model") / "child.py"  # @jit needs a source file
    script.write_text(_CHILD.format(bench=os.path.join(ROOT, "benchmarks")))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith(("{", "["))]
    return lines


def test_copy_kernel_counts(child):
    copy = child[0]
    loop = copy["rows"][0]
    assert copy["ptx"] == [32]  # one 16-byte load + one 16-byte store per thread per iteration
    assert loop["bytes_per_elem"] == 4.0  # bf16: 2 read + 2 written
    assert loop["ld_bytes_per_elem"] == 2.0 and loop["st_bytes_per_elem"] == 2.0
    assert loop["mufu_per_elem"] == 0 and loop["bar_per_elem"] == 0 and loop["shfl_per_elem"] == 0
    assert 0 < loop["sass_per_elem"] < 3  # a handful of address / compare / branch instructions
    assert loop["inner_branches"] == 0 and loop["nested_loops"] == 0


def test_one_training_step_modelled(child):
    rows = child[1]
    for r in rows:
        if r["loop"] == 0:
            assert r["local_bytes"] == 0 and r["spill_instr"] == 0
            assert 0 < r["registers"] <= 255
    # the two-kernel path (grad_inplace): forward, backward
    two = [r for r in rows if r["op"] == "kd_loss_2k"]
    assert [r["kernel"] for r in two if r["loop"] == 0] == ["kd_fwd_kernel", "kd_bwd_kernel"]
    fwd, bwd = (r for r in two if r["loop"] == 0)
    assert fwd["bytes_per_elem"] == 4.0 and bwd["bytes_per_elem"] == 6.0
    assert fwd["mufu_per_elem"] >= 3 and bwd["mufu_per_elem"] >= 3  # exps of a, b, s
    for r in (fwd, bwd):
        assert r["H200_ms"] >= r["H200_mem_ms"] > 0
    # the fused path kd_loss takes: one kernel with the statistics pass and the gradient pass,
    # then the rescale kernel, whose loop runs on no row (grad_loss is the hinted one)
    fused = [r for r in rows if r["op"] == "kd_loss"]
    assert [r["kernel"] for r in fused if r["loop"] == 0] == ["kd_fwd_grad_kernel",
                                                              "kd_rescale_kernel"]
    stats, grad = (r for r in fused if r["kernel"] == "kd_fwd_grad_kernel"
                   and r["loop"] in (0, 1))
    assert stats["bytes_per_elem"] == 4.0 and grad["bytes_per_elem"] == 6.0
    # the statistics pass walks BLOCK (1024) columns per iteration, the gradient pass GBLOCK (4096)
    assert stats["elems_per_iter"] % 1024 == 0 and grad["elems_per_iter"] % 4096 == 0
    rescale = next(r for r in fused if r["kernel"] == "kd_rescale_kernel" and r["loop"] == 0)
    assert rescale["extent"] == 0 and rescale["H200_ms"] == 0


def test_fused_kernels_use_the_fast_intrinsics(child):
    """The GPU build of the fused kernels (sm_90a PTX): every exponential is ex2.approx.ftz (no
    non-ftz ex2 with its fix-up), the mixture ratios and logs are div.approx / lg2.approx
    (kernels.py fast_div / fast_log) and no IEEE or full-range division is left in them; TVD and
    forward KL need no ratio, jsd no division at all (its logs from the exponents of p and q:
    mix_terms_linear). docs/precision.md bounds the intrinsics' error."""
    ops = child[2]
    for div, n in ops.items():
        assert n["ex2.approx.ftz.f32"] > 0 and n["ex2.approx.f32"] == 0, (div, n)
        assert n["div.rn.f32"] == 0, (div, n)
    for div in ("skew_kl", "skew_reverse_kl"):
        n = ops[div]
        assert n["lg2.approx.ftz.f32"] > 0 and n["div.approx.ftz.f32"] > 0, (div, n)
    n = ops["jsd"]
    assert n["lg2.approx.ftz.f32"] > 0 and n["div.approx.ftz.f32"] == 0 and n["div.full.f32"] == 0, n


def test_every_variant_recorded():
    """Every divergence × dtype × label mode records its launches (no compile), and each kernel
    the launchers pick is described in TRITON_LOOPS."""
    env_backup = os.environ.get("TRITON_INTERPRET")
    try:
        variants = G.triton_variants(caps=[90], dtypes=list(G.DTYPES), divs=range(6))
    finally:
        if env_backup is not None:
            os.environ["TRITON_INTERPRET"] = env_backup
    got = {(v["op"], v["dtype"], v["div"], v["mode"]) for v, _ in variants}
    want = {("kd_loss", dt, G.DIV_NAMES[d], m) for dt in G.DTYPES for d in range(6)
            for m, _, _ in G.LABEL_MODES}
    want |= {("kd_loss", dt, "-", "hard_only") for dt in G.DTYPES}
    want |= {("sparse_kd_loss", dt, "forward_kl", m) for dt in G.DTYPES
             for m in ("labels_free", "hard")}
    assert want <= got, sorted(want - got)
    for v, launches in variants:
        assert launches, v
        for ln in launches:
            assert ln.kernel in G.TRITON_LOOPS, ln.kernel


def test_committed_csv_covers_every_variant():
    import csv
    path = os.path.join(ROOT, "benchmarks", "results", "gpu-model", "model.csv")
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if r["loop"] == "TOTAL"]
    got = {(r["impl"], r["cap"], r["dtype"], r["div"], r["mode"]) for r in rows}
    for cap in ("90", "80"):
        for dt in G.DTYPES:
            for d in G.DIV_NAMES:
                for m, _, _ in G.LABEL_MODES:
                    assert ("triton", cap, dt, d, m) in got
                assert ("cuda", cap, dt, d, "hard") in got


def test_cluster_ab_reads_the_model_predictions():
    """cuda_cluster_ab.py's model columns: both CUDA kernels, every divergence, both cards, from the
    committed model.csv (a renamed op or column would leave them empty)."""
    import cuda_cluster_ab as ab
    m = ab.model_ms()
    for op in ("kd_loss", "kd_loss_1cta"):
        for div in ab.DIVS:
            assert set(m[(op, div)]) == {"H100", "H200"} and all(v > 0 for v in m[(op, div)].values())
    assert ab.cards_for("NVIDIA H200") == ["H200"] and ab.cards_for("NVIDIA A100") == ["H100", "H200"]
