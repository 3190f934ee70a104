"""Integrations (kdkernels.integrations.*) against the frameworks' own losses where installed, and
against faithful float64 re-statements of their formulas otherwise; Hugging Face Trainer with a
tiny randomly initialised model built from a config (no downloads)."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import oracle
from conftest import assert_close
from kdkernels.integrations import torchtune as kd_tt
from kdkernels.integrations import trl as kd_trl

HAS_TRL = importlib.util.find_spec("trl") is not None
HAS_TT = importlib.util.find_spec("torchtune") is not None and \
    importlib.util.find_spec("torchao") is not None
HAS_HF = importlib.util.find_spec("transformers") is not None and \
    importlib.util.find_spec("accelerate") is not None


def _ugly_logits(B, L, V, Vt=None, scale=3.0):
    s = torch.randn(B, L + 1, V, dtype=torch.float64) * scale
    t = torch.randn(B, L + 1, Vt or V, dtype=torch.float64) * scale
    s[..., 3] = t[..., 3] = float("-inf")           # a masked vocabulary entry, shared
    s[0, 1] *= 3000.0                               # |logits| ~ 1e4
    t[1, 2] *= 3000.0
    # strided views, as the trainers pass them: logits[:, :-1]
    return s[:, :-1], t[:, :-1]


def _labels(B, L, V, ignore_every=3):
    y = torch.randint(0, V, (B, L))
    y.view(-1)[::ignore_every] = -100
    return y


# ---- TRL: generalized_jsd_loss ---------------------------------------------------------------

def trl_restated(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                 reduction="batchmean", num_items_in_batch=None):
    """TRL's documented generalized JSD, restated in float64 from its definition (Agarwal et al.,
    GKD, eq. 1, teacher weight beta), with TRL's masking and reductions."""
    V = student_logits.shape[-1]
    lq = torch.log_softmax(student_logits.double() / temperature, -1)
    lp = torch.log_softmax(teacher_logits[..., :V].double() / temperature, -1)
    lq, lp = lq.clamp_min(-1e300), lp.clamp_min(-1e300)  # finite logs: 0 * log 0 = 0
    if beta == 0:    # TRL's special case: KL(teacher || student)
        el = lp.exp() * (lp - lq)
    elif beta == 1:  # TRL's special case: KL(student || teacher)
        el = lq.exp() * (lq - lp)
    else:
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        el = beta * lp.exp() * (lp - lm) + (1 - beta) * lq.exp() * (lq - lm)   # [..., V]
    if labels is not None:
        el = el[labels != -100]
    if num_items_in_batch is not None:
        return el.sum() / num_items_in_batch
    if reduction == "batchmean":
        n = int((labels != -100).sum()) if labels is not None else el.shape[0]
        return el.sum() / max(n, 1)
    if reduction == "sum":
        return el.sum()
    return el.mean()


def _trl_original():
    kd_trl._gkd_trainer_class()  # raises ImportError when missing
    cls = kd_trl._gkd_trainer_class()
    fn = cls.__dict__["generalized_jsd_loss"]
    return fn.__func__ if isinstance(fn, staticmethod) else fn


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("reduction,with_labels,nib", [
    ("batchmean", True, None), ("batchmean", False, None), ("sum", True, None),
    ("mean", True, None), ("sum", False, None), ("batchmean", True, 17), ("mean", False, "tensor")])
def test_trl_values_and_grads(beta, temperature, reduction, with_labels, nib):
    B, L, V = 2, 6, 37
    s64, t64 = _ugly_logits(B, L, V)
    labels = _labels(B, L, V) if with_labels else None
    if nib == "tensor":
        nib = torch.tensor(23)
    kw = dict(labels=labels, beta=beta, temperature=temperature, reduction=reduction,
              num_items_in_batch=nib)
    for dtype in (torch.float32, torch.float64):
        s = s64.to(dtype).detach().requires_grad_(True)
        out = kd_trl.generalized_jsd_loss(s, t64.to(dtype), **kw)
        out.backward()
        s_ref = s64.detach().clone().requires_grad_(True)
        exp = trl_restated(s_ref, t64, **kw)
        exp.backward()
        assert_close(out.detach().reshape(()), exp.detach(), dtype, what="trl value")
        assert_close(s.grad, s_ref.grad, dtype, what="trl grad")


@pytest.mark.skipif(not HAS_TRL, reason="trl is not installed (pip install 'kdkernels[trl]')")
@pytest.mark.parametrize("beta,temperature", [(0.3, 1.0), (0.5, 2.0), (0.8, 0.7)])
@pytest.mark.parametrize("reduction,with_labels,nib", [
    ("batchmean", True, None), ("batchmean", False, None), ("sum", True, None),
    ("mean", True, None), ("batchmean", True, 11)])
def test_trl_against_trl_itself(beta, temperature, reduction, with_labels, nib):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = _trl_original()
    B, L, V = 2, 5, 29
    s64 = torch.randn(B, L, V, dtype=torch.float64) * 3
    t64 = torch.randn(B, L, V, dtype=torch.float64) * 3
    labels = _labels(B, L, V) if with_labels else None
    kw = dict(labels=labels, beta=beta, temperature=temperature, reduction=reduction,
              num_items_in_batch=nib)
    a = s64.clone().requires_grad_(True)
    b = s64.clone().requires_grad_(True)
    ours = kd_trl.generalized_jsd_loss(a, t64, **kw)
    theirs = original(b, t64, **kw)
    ours.backward()
    theirs.backward()
    assert_close(ours.detach(), theirs.detach(), torch.float64, what="vs trl")
    assert_close(a.grad, b.grad, torch.float64, what="grad vs trl")
    # their restatement agrees with TRL too (so the fallback test above is faithful)
    assert_close(trl_restated(s64, t64, **kw), theirs.detach(), torch.float64, what="restated")


@pytest.mark.skipif(not HAS_TRL, reason="trl is not installed (pip install 'kdkernels[trl]')")
def test_trl_patch_gkd_trainer():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = kd_trl._gkd_trainer_class()
    previous = kd_trl.patch_gkd_trainer()
    try:
        assert cls.generalized_jsd_loss is kd_trl.generalized_jsd_loss
        s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
        exp = trl_restated(s, t, beta=0.4)
        assert_close(cls.generalized_jsd_loss(s, t, beta=0.4), exp.float(), torch.float32)
    finally:
        cls.generalized_jsd_loss = previous


@pytest.mark.parametrize("beta", [0.0, 1.0, 0, 1])
@pytest.mark.parametrize("reduction,with_labels,nib", [
    ("batchmean", True, None), ("batchmean", False, None), ("sum", True, None),
    ("mean", False, None), ("batchmean", True, 13)])
def test_trl_beta_ends_are_trls_kls(beta, reduction, with_labels, nib):
    """Issue 21: GKDConfig(beta=0.0 / 1.0) are TRL's forward / reverse KL special cases; the
    drop-in used to raise there at the first training step. Values and gradients against the
    float64 restatement (and against TRL itself in the next test)."""
    B, L, V = 2, 6, 37
    s64, t64 = _ugly_logits(B, L, V)
    s64[..., 3] = 0.0  # a -inf shared column is fine; a -inf in one of them only would be +inf
    t64[..., 3] = 0.0
    labels = _labels(B, L, V) if with_labels else None
    kw = dict(labels=labels, beta=beta, temperature=2.0, reduction=reduction,
              num_items_in_batch=nib)
    for dtype in (torch.float32, torch.float64):
        s = s64.to(dtype).detach().requires_grad_(True)
        out = kd_trl.generalized_jsd_loss(s, t64.to(dtype), **kw)
        out.backward()
        s_ref = s64.detach().clone().requires_grad_(True)
        exp = trl_restated(s_ref, t64, **kw)
        exp.backward()
        assert_close(out.detach().reshape(()), exp.detach(), dtype, what="trl value")
        assert_close(s.grad, s_ref.grad, dtype, what="trl grad")


@pytest.mark.skipif(not HAS_TRL, reason="trl is not installed (pip install 'kdkernels[trl]')")
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction,with_labels,nib", [
    ("batchmean", True, None), ("batchmean", False, None), ("sum", True, None),
    ("mean", True, None), ("batchmean", True, 11)])
def test_trl_beta_ends_against_trl_itself(beta, temperature, reduction, with_labels, nib):
    """The patched GKDTrainer with GKDConfig(beta=0.0) or beta=1.0 computes what TRL's own
    ``GKDTrainer.generalized_jsd_loss`` computes (values and gradients, float64)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = _trl_original()
        cls = kd_trl._gkd_trainer_class()
        try:
            from trl.experimental.gkd import GKDConfig
        except ImportError:
            from trl import GKDConfig
        config = GKDConfig(output_dir="unused", beta=beta, temperature=temperature,
                           use_cpu=True, report_to=[])
    B, L, V = 2, 5, 29
    s64 = torch.randn(B, L, V, dtype=torch.float64) * 3
    t64 = torch.randn(B, L, V, dtype=torch.float64) * 3
    labels = _labels(B, L, V) if with_labels else None
    # the arguments GKDTrainer.compute_loss passes (beta=self.beta), plus T and the reduction
    kw = dict(labels=labels, beta=config.beta, temperature=config.temperature,
              reduction=reduction, num_items_in_batch=nib)
    previous = kd_trl.patch_gkd_trainer()
    try:
        a = s64.clone().requires_grad_(True)
        ours = cls.generalized_jsd_loss(a, t64, **kw)
    finally:
        cls.generalized_jsd_loss = previous
    b = s64.clone().requires_grad_(True)
    theirs = original(b, t64, **kw)
    ours.backward()
    theirs.backward()
    assert_close(ours.detach(), theirs.detach(), torch.float64, what="vs trl")
    assert_close(a.grad, b.grad, torch.float64, what="grad vs trl")
    assert_close(trl_restated(s64, t64, **kw), theirs.detach(), torch.float64, what="restated")


def test_trl_refuses_beta_outside_and_none():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
        kd_trl.generalized_jsd_loss(s, t, beta=-0.1)
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
        kd_trl.generalized_jsd_loss(s, t, beta=1.5)
    with pytest.raises(ValueError, match="reduction"):
        kd_trl.generalized_jsd_loss(s, t, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        kd_trl.generalized_jsd_loss(s, t, reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        kd_trl.generalized_jsd_loss(s, t, temperature=0)
    with pytest.raises(TypeError, match="beta"):
        kd_trl.generalized_jsd_loss(s, t, beta="half")


def test_trl_all_ignored_is_zero():
    s = torch.randn(2, 3, 5, requires_grad=True)
    out = kd_trl.generalized_jsd_loss(s, torch.randn(2, 3, 5), labels=torch.full((2, 3), -100))
    out.backward()
    assert float(out.detach()) == 0.0 and torch.count_nonzero(s.grad) == 0


# ---- torchtune: forward KL ------------------------------------------------------------------

def torchtune_restated(student, teacher, labels, ignore_index=-100, normalize=True):
    """torchtune ForwardKLLoss, restated in float64: −Σ p log q over non-inf student entries,
    over counted tokens (divided by their count when normalize)."""
    V = student.shape[-1]
    p = torch.softmax(teacher[..., :V].double(), -1)
    lq = torch.log_softmax(student.double(), -1)
    x = torch.where(torch.isinf(student), 0.0, p * lq).sum(-1).reshape(-1)
    keep = (labels.reshape(-1) != ignore_index)
    total = -(x * keep).sum()
    if not normalize:
        return total
    return total / keep.sum() if keep.any() else total * 0


def _teacher_entropy_mean(teacher, labels, V):
    lp = torch.log_softmax(teacher[..., :V].double(), -1)
    h = -torch.where(lp.exp() > 0, lp.exp() * lp, 0.0).sum(-1).reshape(-1)
    keep = labels.reshape(-1) != -100
    return (h * keep).sum() / keep.sum().clamp_min(1)


def _tt_inputs(B=2, L=6, V=41):
    s64 = torch.randn(B * L, V, dtype=torch.float64) * 3
    t64 = torch.randn(B * L, V, dtype=torch.float64) * 3
    s64[:, 5] = t64[:, 5] = float("-inf")
    return s64, t64, _labels(B, L, V)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torchtune_forward_kl_forms(normalize, dtype):
    s64, t64, labels = _tt_inputs()
    ce_ref = torchtune_restated(s64, t64, labels, normalize=normalize)
    h = _teacher_entropy_mean(t64, labels, s64.shape[-1])
    if not normalize:
        h = h * (labels != -100).sum()
    grads = []
    for form, expected in ((True, ce_ref), (False, ce_ref - h)):
        s = s64.to(dtype).requires_grad_(True)
        out = kd_tt.ForwardKLLoss(cross_entropy_form=form)(s, t64.to(dtype), labels,
                                                            normalize=normalize)
        out.backward()
        assert_close(out.detach().reshape(()), expected.to(out.dtype), dtype, what=f"form={form}")
        grads.append(s.grad)
    # the offset is the teacher entropy: gradients do not depend on the form
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    # and KL form is the true KL from the oracle
    kl = oracle.loss(s64, t64, labels=labels.reshape(-1), reduction="batchmean" if normalize else "sum")
    assert_close(grads[0].new_tensor(float(ce_ref - h)), kl.to(grads[0].dtype), dtype, what="kl")


def test_torchtune_chunked_and_all_ignored():
    B, L, V, c = 2, 8, 23, 4
    s = torch.randn(B, L, V, dtype=torch.float64)
    t = torch.randn(B, L, V, dtype=torch.float64)
    labels = _labels(B, L, V)
    loss = kd_tt.ForwardKLWithChunkedOutputLoss(c, cross_entropy_form=True)(
        list(s.chunk(c, dim=1)), list(t.chunk(c, dim=1)), labels)
    exp = torchtune_restated(s.reshape(-1, V), t.reshape(-1, V), labels)
    assert_close(loss, exp, torch.float64)
    with pytest.raises(ValueError, match="chunks"):
        kd_tt.ForwardKLWithChunkedOutputLoss(3)(list(s.chunk(c, 1)), list(t.chunk(c, 1)), labels)
    x = torch.randn(4, V, requires_grad=True)
    out = kd_tt.ForwardKLLoss()(x, torch.randn(4, V), torch.full((4,), -100))
    out.backward()
    assert float(out.detach()) == 0.0 and torch.count_nonzero(x.grad) == 0


@pytest.mark.skipif(not HAS_TT, reason="torchtune (and torchao) not installed: "
                    "pip install 'kdkernels[torchtune]'")
def test_torchtune_against_torchtune_itself():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchtune.modules import loss as ttl
    s64, t64, labels = _tt_inputs(V=53)
    s64[:, 5] = 0.0  # torchtune drops terms at inf *student* logits; keep those out of this check
    for normalize in (True, False):
        a = s64.float().requires_grad_(True)
        b = s64.float().requires_grad_(True)
        ours = kd_tt.ForwardKLLoss(cross_entropy_form=True)(a, t64.float(), labels, normalize)
        theirs = ttl.ForwardKLLoss()(b, t64.float(), labels, normalize)
        ours.backward()
        theirs.backward()
        assert_close(ours.detach(), theirs.detach(), torch.float32, what="vs torchtune")
        assert_close(a.grad, b.grad, torch.float32, what="grad vs torchtune")
    B, L, V, c = 2, 8, 31, 4
    s, t, y = torch.randn(B, L, V), torch.randn(B, L, V), _labels(B, L, V)
    ours = kd_tt.ForwardKLWithChunkedOutputLoss(c, cross_entropy_form=True)(
        list(s.chunk(c, 1)), list(t.chunk(c, 1)), y)
    theirs = ttl.ForwardKLWithChunkedOutputLoss(c)(list(s.chunk(c, 1)), list(t.chunk(c, 1)), y)
    assert_close(ours, theirs, torch.float32, what="chunked vs torchtune")


# ---- Hugging Face transformers ---------------------------------------------------------------

hf = pytest.mark.skipif(not HAS_HF, reason="transformers/accelerate not installed: "
                        "pip install 'kdkernels[hf]'")


def _tiny_llama(vocab, hidden, layers, seed):
    import transformers
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).float()


def _batch(B=4, L=9, V=61, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, L), generator=g)
    labels = ids.clone()
    labels[0, :6] = -100                       # uneven counted tokens per row
    labels[2, 2:4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@hf
@pytest.mark.parametrize("divergence,kw", [("forward_kl", {}), ("jsd", {"beta": 0.3})])
def test_hf_distillation_loss_matches_oracle(divergence, kw):
    from kdkernels.integrations.huggingface import distillation_loss
    V = 61
    student = _tiny_llama(V, 32, 1, seed=1)
    teacher = _tiny_llama(V + 3, 48, 2, seed=2)   # padded teacher vocabulary
    batch = _batch(V=V)
    loss = distillation_loss(student, teacher, batch, divergence=divergence, temperature=2.0,
                             hard_weight=0.5, **kw)
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    exp = oracle.loss(s.reshape(-1, V).double(), t.reshape(-1, V + 3).double(),
                      divergence_name=divergence, temperature=2.0, hard_weight=0.5,
                      labels=batch["labels"][:, 1:].reshape(-1), **kw)
    assert_close(loss.detach().double(), exp, torch.float32, what="hf loss")
    assert teacher.training is True  # restored


def _run_trainer(tmp_path, student, teacher, data, batch_size, accum, lr):
    import transformers
    from kdkernels.integrations.huggingface import KDTrainer
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accum, max_steps=1, learning_rate=lr, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True,
        dataloader_num_workers=0)
    trainer = KDTrainer(model=student, args=args, train_dataset=data, teacher_model=teacher,
                        temperature=2.0)
    trainer.train()
    return trainer


@hf
def test_hf_trainer_gradient_accumulation_matches_full_batch(tmp_path):
    """One optimizer step with 2 micro-batches of 2 equals one step on the batch of 4 and equals
    a hand-computed SGD step on sum / (global counted tokens); a mean of micro-batch means
    (what ignoring num_items_in_batch gives) would differ, because counts are uneven."""
    from kdkernels import kd_loss
    V, lr = 61, 0.5
    batch = _batch(V=V)
    data = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    teacher = _tiny_llama(V, 48, 2, seed=2)
    init = _tiny_llama(V, 32, 1, seed=1)
    state = {k: v.clone() for k, v in init.state_dict().items()}

    # expected: plain SGD on the global-token-mean loss
    ref = _tiny_llama(V, 32, 1, seed=1)
    s = ref(input_ids=batch["input_ids"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"]).logits[:, :-1]
    kd_loss(s, t, temperature=2.0, labels=batch["labels"][:, 1:]).backward()
    expected = {n: p.detach() - lr * p.grad for n, p in ref.named_parameters()}
    # the wrong answer (mean of the two micro-batch means), to show the test can tell them apart
    ref.zero_grad()
    halves = [slice(0, 2), slice(2, 4)]
    for h in halves:
        s = ref(input_ids=batch["input_ids"][h]).logits[:, :-1]
        (kd_loss(s, t[h], temperature=2.0, labels=batch["labels"][h, 1:]) / 2).backward()
    wrong = {n: p.detach() - lr * p.grad for n, p in ref.named_parameters()}

    results = {}
    for bs, accum in ((4, 1), (2, 2)):
        student = _tiny_llama(V, 32, 1, seed=1)
        student.load_state_dict(state)
        _run_trainer(tmp_path / f"{bs}x{accum}", student, teacher, data, bs, accum, lr)
        results[(bs, accum)] = dict(student.named_parameters())
    name = "lm_head.weight"
    gap = (expected[name] - wrong[name]).abs().max()
    assert gap > 1e-5, "test set-up: uneven counts must make the two normalisations differ"
    for key, params in results.items():
        for n in expected:
            err = (params[n].detach() - expected[n]).abs().max()
            assert err < gap / 50 + 1e-7, f"{key} {n}: {err:.2e} (gap to wrong answer {gap:.2e})"


@hf
def test_hf_fused_linear_path_matches_logits_path():
    import kdkernels
    if not hasattr(kdkernels, "fused_linear_kd_loss"):
        pytest.skip("kdkernels.fused_linear_kd_loss is not available in this build yet")
    from kdkernels.integrations.huggingface import distillation_loss
    V = 61
    student = _tiny_llama(V, 32, 1, seed=1)
    teacher = _tiny_llama(V, 48, 2, seed=2)
    batch = _batch(V=V)
    grads = []
    losses = []
    for fused in (False, True):
        student.zero_grad()
        loss = distillation_loss(student, teacher, batch, fused_linear=fused, temperature=2.0,
                                 hard_weight=0.25, num_items_in_batch=29)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in student.named_parameters()})
    assert_close(losses[1], losses[0], torch.float32, what="fused loss")
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n], torch.float32, what=f"fused grad {n}")


@hf
def test_hf_errors():
    from kdkernels.integrations.huggingface import distillation_loss
    m = _tiny_llama(11, 16, 1, seed=0)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(m, m, {"input_ids": torch.zeros(1, 3, dtype=torch.long)})


def test_integrations_import_without_frameworks():
    import subprocess
    import sys
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, *a, **k):\n"
            "        if name.split('.')[0] in ('transformers', 'trl', 'torchtune'):\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import kdkernels, kdkernels.integrations.huggingface as h, kdkernels.integrations.trl,"
            " kdkernels.integrations.torchtune\n"
            "try:\n    h.KDTrainer\nexcept ImportError as e:\n    print('ok', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok") and "kdkernels[hf]" in out.stdout
