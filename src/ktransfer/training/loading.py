"""The models and tokenizer of a run: the frozen teacher, the learner (resumed, ``model.init``, or a new
``model.preset``, with LoRA adapters when asked) and its tokenizer (given, the teacher's, or a joint BPE trained on
the training split). Every loading error becomes a ``ConfigError`` naming the key that chose the model.
"""

from __future__ import annotations

import torch

from ktransfer.models import checkpoint as ckpt_lib
from ktransfer.models import family as models
from ktransfer.models.tokenizer import Tokenizer, compare_tokenizers, load_tokenizer
from ktransfer.training.bpe import train_joint_bpe
from ktransfer.training.config import ConfigError, RunConfig


def _load(cfg: RunConfig, key: str, source: str, device="cpu", **overrides):
    """``models.load_model(source)`` with its errors as a ConfigError naming ``key``."""
    try:
        return models.load_model(source, device=device, trust_remote_code=cfg.model.trust_remote_code, **overrides)
    except (ckpt_lib.CheckpointError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{key}: {e}", key=key) from None


def load_teacher(cfg: RunConfig, device: torch.device, log) -> tuple[torch.nn.Module | None, Tokenizer | None]:
    """The teacher of ``model.teacher`` (any model source), frozen: eval mode, no gradients; ``(None, None)``
    without one. A teacher folder without tokenizer files takes ``data.tokenizer``."""
    if not cfg.model.teacher:
        return None, None
    teacher, tokenizer = _load(cfg, "model.teacher", cfg.model.teacher, device)
    if tokenizer is None:
        tokenizer = _given_tokenizer(cfg)
        if tokenizer is None:
            raise ConfigError(f"model.teacher: {cfg.model.teacher} has no tokenizer files: give data.tokenizer",
                              key="data.tokenizer")
    teacher.eval().requires_grad_(False)
    dtype = teacher_dtype(cfg.model.teacher_dtype, device)
    teacher.to(dtype)
    log(f"teacher: {cfg.model.teacher} ({type(teacher).__name__}, {sum(p.numel() for p in teacher.parameters()):,} "
        f"parameters, frozen, {str(dtype).removeprefix('torch.')})")
    from ktransfer.training.prefixes import describe_source

    log(describe_source(cfg))
    return teacher, tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    """``model.teacher_dtype``: ``auto`` is bfloat16 on a CUDA device that supports it, else float32."""
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def _given_tokenizer(cfg: RunConfig) -> Tokenizer | None:
    if not cfg.data.tokenizer:
        return None
    try:
        return load_tokenizer(cfg.data.tokenizer, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {e}", key="data.tokenizer") from None


def learner_and_tokenizer(cfg: RunConfig, resumed, teacher_tokenizer, train_examples, log):
    """The learner (train mode) and its tokenizer: a resumed run's; else ``model.init``'s (any model source); else a
    new model of ``model.preset`` (a preset or a model source) for data.tokenizer, the teacher's tokenizer, or a
    joint BPE trained on the training split, in that order."""
    overrides = {} if cfg.model.dropout is None else {"dropout": cfg.model.dropout}
    given = _given_tokenizer(cfg)
    start, key = (resumed.path, "train.out_dir") if resumed is not None else (cfg.model.init, "model.init")
    if start:
        model, tokenizer = _load(cfg, key, start, **overrides)
        if tokenizer is None:
            tokenizer = given or teacher_tokenizer
            if tokenizer is None:
                raise ConfigError(f"{key}: {start} has no tokenizer files: give data.tokenizer", key="data.tokenizer")
        elif given is not None and resumed is None:
            try:
                compare_tokenizers(tokenizer, given, f"model.init {start}", f"data.tokenizer {cfg.data.tokenizer}")
            except ValueError as e:
                raise ConfigError(f"data.tokenizer: {e}", key="data.tokenizer") from None
        if resumed is None:
            log(f"learner initialised from {start} (model.preset not used)")
            model = _with_lora(cfg, model, log)
        return model.train(), tokenizer
    tokenizer = given or teacher_tokenizer or train_joint_bpe(train_examples, cfg.data.vocab_size, log)
    try:
        model = models.build_model(cfg.model.preset, tokenizer, trust_remote_code=cfg.model.trust_remote_code,
                                   **overrides)
    except ValueError as e:
        raise ConfigError(f"model.preset: {e}", key="model.preset") from None
    return _with_lora(cfg, model, log).train(), tokenizer


def _with_lora(cfg: RunConfig, model, log):
    """The learner with fresh LoRA adapters when ``model.lora_r`` is set (``ktransfer.models.adapters``), else
    itself."""
    m = cfg.model
    if m.lora_r is None:
        return model
    from ktransfer.models import adapters

    try:
        model = adapters.add_lora(model, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                                  target_modules=m.lora_target_modules, causal=models.family_of(model).name == "causal")
    except ImportError as e:
        raise ConfigError(f"model.lora_r: {e}", key="model.lora_r") from None
    except ValueError as e:
        raise ConfigError(str(e), key="model.lora_r") from None
    log(f"LoRA: rank {m.lora_r}, alpha {m.lora_alpha}, dropout {m.lora_dropout}, "
        f"{adapters.parameter_summary(model)}")
    return model


def gradient_checkpointing(model, log) -> None:
    """Recompute the learner's layer activations in backward (``transformers``' own checkpointing, non-reentrant:
    the same gradients; dropout masks are replayed from the saved RNG state).

    Raises:
        ConfigError: a model class without gradient checkpointing.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it",
                          key="train.gradient_checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    log("gradient checkpointing: the learner's layer activations are recomputed in the backward pass")


def shared_vocab_size(cfg: RunConfig, teacher, model, teacher_tokenizer, tokenizer, log) -> int:
    """The ids learner and teacher share (``models.check_compatible``); the tokenizer's size without a teacher."""
    if teacher is None:
        return tokenizer.vocab_size
    try:
        return models.check_compatible(teacher, model, teacher_tokenizer, tokenizer, log=log)
    except ValueError as e:
        raise ConfigError(f"model.teacher: {cfg.model.teacher}: {e}", key="model.teacher") from None


def check_fused_head(model, teacher) -> None:
    """``train.fused_head``: both models' output layers can be fused with the loss (``fused_linear.output_head``).

    Raises:
        ConfigError: a model whose logits are not a plain linear head of its body (naming it).
    """
    from ktransfer.losses.fused_linear import output_head

    for name, m in (("learner", model), ("teacher", teacher)):
        try:
            if m is not None:
                output_head(m)
        except ValueError as e:
            raise ConfigError(f"train.fused_head: the {name}: {e}", key="train.fused_head") from None
