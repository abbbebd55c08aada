"""Output projection and Eq. 12 fused, for large vocabularies: the ``[N, V]`` logits of either model never exist.

For chunks of c positions at a time:

    z_c = h_c W^T + b          (learner logits, [c, V])     u_c = g_c Wt^T + bt    (teacher logits, [c, V], no grad)
    value, dL/dz_c             (the chunked sweep of ``ktransfer.losses.divergences``, NLL and divergence together)
    dL/dh_c = dL/dz_c W        dL/dW += dL/dz_c^T h_c       dL/db += sum_rows dL/dz_c

so the extra memory is O(c x V) plus the gradients of h, W and b, whatever N is. The value and every gradient equal
those of ``transfer_loss(h @ W.T + b, g @ Wt.T + bt, labels, ...)``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ktransfer.losses import chunking
from ktransfer.losses.divergences import check_vocab_size, compute_dtype, run_chunk
from ktransfer.losses.objectives import TransferLoss, plan_loss
from ktransfer.losses.spec import DIVERGENCE_OPTIONS, LossSpec

# Positions per chunk on a CPU: about 2**23 / V, at least 128. Each chunk adds its dL/dz^T h to the [V, H] weight
# gradient, reading and writing all of it, so few rows per chunk make that traffic dominate: at N = 4096, H = 512,
# V = 32000 (2 threads) chunks of 64 rows took 4.7 s, 256 rows 3.3 s (materialised logits: 3.4 s); at V = 128000,
# 32 rows 26.6 s, 128 rows 17.2 s (materialised: 18.6 s and 5.8 GB). See docs/benchmarks.md.
CHUNK_ELEMENTS_CPU = 1 << 23
MIN_CHUNK_ROWS_CPU = 128


def _weight_and_bias(head, bias):
    if isinstance(head, torch.nn.Linear):
        return head.weight, head.bias if bias is None else bias
    return head, bias


def _first_rows(W, b, vocab_size):
    """``W[:vocab_size]``, ``b[:vocab_size]`` (views: the padding rows get a zero gradient); None keeps them."""
    if vocab_size is None or W.shape[0] == vocab_size:
        return W, b
    return W[:vocab_size], None if b is None else b[:vocab_size]


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, b, ht, Wt, bt, plan, chunk):
        need_h, need_W, need_b = ctx.needs_input_grad[:3]
        need = need_h or need_W or need_b
        N = h.shape[0]
        cdt = compute_dtype(h, ht)
        rows = plan.rows
        n_sel = N if rows is None else rows.numel()
        grad_h = torch.zeros_like(h) if need_h else None
        grad_W = torch.zeros(W.shape, dtype=cdt, device=W.device) if need_W else None
        grad_b = torch.zeros(b.shape, dtype=cdt, device=b.device) if need_b else None
        div_sum = h.new_zeros((), dtype=cdt)
        nll_sum = h.new_zeros((), dtype=cdt)
        loss = h.new_zeros((), dtype=cdt)
        for start in range(0, n_sel, chunk):
            sel = slice(start, min(start + chunk, n_sel)) if rows is None else rows[start : start + chunk]
            hc = h[sel]
            z = F.linear(hc, W, b)  # (c, V)
            u = F.linear(ht[sel], Wt, bt) if plan.spec.terms else None
            dc = plan.div_scale[sel].to(cdt).unsqueeze(-1)
            nc = plan.nll_scale[sel].to(cdt).unsqueeze(-1)
            v, n, g, bad = run_chunk(z, u, plan.labels[sel], plan.spec, dc, nc, need)
            if bool(bad.any()):
                raise ValueError("a position has no finite logit in the learner or the teacher (all -inf)")
            if v is not None:
                div_sum += v.sum()
                loss += (v * dc.squeeze(-1)).sum()
            nll_sum += n.sum()
            loss += (n * nc.squeeze(-1)).sum()
            if need:
                if need_h:
                    grad_h[sel] = (g.to(W.dtype) @ W).to(h.dtype)
                if need_W:
                    grad_W.addmm_(g.t(), hc.to(cdt))
                if need_b:
                    grad_b += g.sum(0)
        ctx.save_for_backward(*(x for x in (grad_h, grad_W, grad_b) if x is not None))
        ctx.which = (need_h, need_W, need_b)
        ctx.dtypes = (W.dtype, None if b is None else b.dtype)
        ctx.mark_non_differentiable(div_sum, nll_sum)
        return loss, div_sum, nll_sum

    @staticmethod
    def backward(ctx, grad_out, _g1, _g2):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if need else None for need in ctx.which]
        scale = None if bool(grad_out == 1) else grad_out
        out = []
        for g, dtype in zip(grads, (None, *ctx.dtypes), strict=True):
            if g is not None:
                g = g if scale is None else g * scale.to(g.dtype)
                g = g if dtype is None else g.to(dtype)
            out.append(g)
        return out[0], out[1], out[2], None, None, None, None, None


def fused_linear_divergence(
    learner_hidden: torch.Tensor,
    learner_head: torch.Tensor | torch.nn.Linear,
    teacher_hidden: torch.Tensor | None,
    teacher_head: torch.Tensor | torch.nn.Linear | None,
    kind: str = "ka",
    *,
    labels: torch.Tensor | None = None,
    lam: float = 1.0,
    top_k: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    num_tokens: int | torch.Tensor | None = None,
    learner_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
    **divergence_options,
) -> TransferLoss:
    """``transfer_loss`` on ``h W^T + b`` and ``g Wt^T + bt`` without materialising either ``[N, V]`` logits.

    Args:
        learner_hidden: h ``[..., H]`` (receives a gradient).
        learner_head: W ``[V, H]`` or an ``nn.Linear`` (weight and bias receive gradients).
        teacher_hidden: g ``[..., Ht]``, frozen; None only for ``kind="nll"``.
        teacher_head: Wt ``[V, Ht]`` or an ``nn.Linear``, frozen.
        kind: any objective of ``transfer_loss`` (``"kd"``, ``"ka"``, ``"half"``, a divergence kind, or ``"nll"``).
        labels: ``[...]`` reference tokens (``ignore_index`` = not counted). None: every position counts, and
            ``lam`` must be 1 (pure divergence).
        lam, top_k, temperature, label_smoothing, num_tokens, **divergence_options: as in ``transfer_loss``.
        chunk_size: positions per chunk; None = about 2**23 / V on a CPU (at least 128); on a GPU
            2**20-2**26 elements / V scaled to the free memory (``ktransfer.losses.chunking``).
        vocab_size: use only the first ``vocab_size`` rows of both heads (and biases): the ids shared by two output
            layers padded to different sizes, as ``transfer_loss(..., vocab_size=)``.

    Returns:
        ``TransferLoss`` with the same value as ``transfer_loss`` on the materialised logits.
    """
    unknown = sorted(set(divergence_options) - set(DIVERGENCE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown divergence option(s) {unknown}; valid: {', '.join(DIVERGENCE_OPTIONS)}")
    spec = LossSpec.of(kind, lam, top_k=top_k, temperature=temperature, label_smoothing=label_smoothing,
                       vocab_size=vocab_size, chunk_size=chunk_size, **divergence_options)
    return fused_spec_loss(spec, learner_hidden, learner_head, teacher_hidden, teacher_head, labels=labels,
                           learner_bias=learner_bias, teacher_bias=teacher_bias, num_tokens=num_tokens,
                           ignore_index=ignore_index)


def fused_spec_loss(spec: LossSpec, learner_hidden, learner_head, teacher_hidden, teacher_head, *, labels=None,
                    learner_bias=None, teacher_bias=None, num_tokens=None, ignore_index: int = -100) -> TransferLoss:
    """``fused_linear_divergence`` with its settings in one ``LossSpec`` (heads cut to ``spec.vocab_size`` rows)."""
    vocab_size, chunk_size = spec.vocab_size, spec.chunk_size
    W, b = _weight_and_bias(learner_head, learner_bias)
    check_vocab_size(vocab_size, learner_head=W.shape[0],
                     teacher_head=None if teacher_head is None else _weight_and_bias(teacher_head, None)[0].shape[0])
    W, b = _first_rows(W, b, vocab_size)
    H = learner_hidden.shape[-1]
    if W.dim() != 2 or W.shape[1] != H:
        raise ValueError(f"learner_head must be [V, H={H}], got {list(W.shape)}")
    V = W.shape[0]
    lead = tuple(learner_hidden.shape[:-1])
    Wt = bt = None
    if teacher_head is not None:
        Wt, bt = _first_rows(*_weight_and_bias(teacher_head, teacher_bias), vocab_size)
        if teacher_hidden is None or Wt.dim() != 2 or Wt.shape[1] != teacher_hidden.shape[-1]:
            raise ValueError(f"teacher_head must be [V, Ht] matching teacher_hidden [..., Ht], got {list(Wt.shape)} "
                             f"and {None if teacher_hidden is None else list(teacher_hidden.shape)}")
        if tuple(teacher_hidden.shape[:-1]) != lead:
            raise ValueError(f"teacher_hidden positions {list(teacher_hidden.shape[:-1])} differ from "
                             f"learner_hidden positions {list(lead)}")
    if labels is None:
        if spec.lam != 1.0:
            raise ValueError(f"lam={spec.lam} < 1 mixes in an NLL term, which needs labels")
        labels = torch.zeros(lead, dtype=torch.long, device=learner_hidden.device)
    plan = plan_loss(spec, (*lead, V), None if Wt is None else (*lead, Wt.shape[0]), labels, learner_hidden.device,
                     ignore_index=ignore_index, num_tokens=num_tokens)
    if chunk_size is None:
        chunk_size = chunking.default_chunk_rows(learner_hidden.device, V, cpu_elements=CHUNK_ELEMENTS_CPU,
                                                 min_cpu_rows=MIN_CHUNK_ROWS_CPU)
    h2 = learner_hidden.reshape(-1, H)
    ht2 = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]) if plan.spec.terms else None
    if ht2 is not None:
        Wt, bt = Wt.detach(), None if bt is None else bt.detach()
    loss, div_sum, nll_sum = _FusedLinear.apply(h2, W, b, ht2, Wt, bt, plan, chunk_size)
    return plan.result(loss, div_sum, nll_sum)


# Config fields that change a causal LM's logits after its head: fusing would drop them, so such models are refused.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@functools.cache
def _causal_classes() -> frozenset[str]:
    """Names of transformers' causal LM classes (GPT2LMHeadModel, LlamaForCausalLM, ...), read once: ``output_head``
    runs in every fused training step."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def output_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear, torch.Tensor | None]:
    """``(body, head, bias)`` of a model whose logits are ``head(body(**inputs)[0]) + bias``, bias ``[V]`` or None.

    - ``MarianMTModel`` (the seq2seq models of ``ktransfer.models.family``): ``lm_head`` (a bias-free ``nn.Linear``
    tied to
      the embeddings) plus the ``final_logits_bias`` buffer ``[1, V]``, on the decoder output of ``model.model``;
    - a ``transformers`` causal LM class (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...) with a plain linear
      ``lm_head`` on the output of its base model (``model.base_model``), and no logit softcapping or scaling in its
      config (those are refused by name: the fused loss would leave them out).

    Subclasses that override ``forward`` outside ``transformers`` are refused: their logits may be computed otherwise.

    Raises:
        ValueError: any other model, naming its class (and the config field that changes its logits).
    """
    from transformers import MarianMTModel

    if (isinstance(model, MarianMTModel) and type(model).forward is MarianMTModel.forward
            and isinstance(model.lm_head, torch.nn.Linear)):
        bias = model.final_logits_bias.reshape(-1)
        if model.lm_head.bias is not None:
            bias = bias + model.lm_head.bias
        return model.model, model.lm_head, bias
    name = type(model).__name__
    head = getattr(model, "lm_head", None)
    if (name in _causal_classes() and type(model).forward.__module__.startswith("transformers.")
            and type(head) is torch.nn.Linear and getattr(model, "base_model", model) is not model):
        config = model.config
        scaled = [k for k in LOGIT_TRANSFORMS if getattr(config, k, None) not in (None, 1, 1.0)]
        if scaled:
            fields = ", ".join(f"{k}={getattr(config, k)}" for k in scaled)
            raise ValueError(f"{name} changes its logits after the head ({fields}): the fused head would leave that "
                             "out; train without train.fused_head")
        return model.base_model, head, head.bias
    raise ValueError(f"{name} is not a model whose output layer ktransfer can fuse (a MarianMTModel with a plain "
                     "linear lm_head and final_logits_bias, or a transformers *ForCausalLM with a plain linear "
                     "lm_head)")


def fused_model_loss(model: torch.nn.Module, teacher: torch.nn.Module | None, inputs: dict, labels: torch.Tensor, *,
                     objective: str | None = None, lam: float = 0.5, spec: LossSpec | None = None,
                     num_tokens=None, **options) -> TransferLoss:
    """``transfer_loss(model(**inputs).logits, teacher(**inputs).logits, labels, ...)`` without either logits.

    Runs the bodies (``output_head``) for the last hidden states ``[B, T, H]`` (the teacher's under ``no_grad``) and
    calls ``fused_spec_loss`` with each model's head and bias. The settings: ``spec``, or ``objective``, ``lam`` and
    the ``options`` of ``transfer_loss``. Value and gradients equal the unfused ones up to float rounding (heads
    padded beyond ``spec.vocab_size`` included: their extra rows are left out as the unfused path slices them).
    """
    if spec is None:
        spec = LossSpec.of(objective, lam, **options)
    inputs = dict(inputs)
    keep = inputs.pop("logits_to_keep", None)  # causal: logits of the last `keep` positions only (the labels')
    window = (lambda x: x) if not keep else (lambda x: x[:, -keep:])  # noqa: E731
    body, head, bias = output_head(model)
    h = window(body(**inputs, use_cache=False)[0])
    g = t_head = t_bias = None
    if teacher is not None and spec.needs_teacher:
        t_body, t_head, t_bias = output_head(teacher)
        with torch.no_grad():
            g = window(t_body(**inputs, use_cache=False)[0])
    return fused_spec_loss(spec, h, head, g, t_head, labels=labels, learner_bias=bias, teacher_bias=t_bias,
                           num_tokens=num_tokens)
