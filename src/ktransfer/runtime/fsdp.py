"""Sharded training with FSDP2 (``train.distributed=fsdp`` under torchrun): the learner and the teacher are split
across the processes, one transformer block at a time.

``shard(model)`` applies ``torch.distributed.fsdp.fully_shard`` to every block (the classes the model names in
``_no_split_modules``: ``GPT2Block``, ``LlamaDecoderLayer``, ...; Marian's encoder and decoder layers) and then to
the model itself (embeddings, final norm and head, tied weights together). Each process holds 1/N of every weight,
gradient and AdamW moment; a block's weights are gathered for its forward and backward and freed after. The teacher
is sharded the same way and has no optimiser state. Every forward is a collective, so every rank runs the same
passes: validation and its translations run whole on every rank (not split as under DDP), and what would run a
different number of passes per rank (on-policy sampling, the teacher cache build, the fused head, LoRA) is refused.

Checkpoints stay Hugging Face folders that any number of processes resumes: every process takes part in gathering
the full weights and the full optimiser state (``full_model_state``, ``full_optimizer_state``: collectives), rank 0
writes them in the layout of a single process (the optimiser keyed by parameter index, as ``optimizer.state_dict()``
gives it). Resuming under FSDP loads the full weights before sharding and scatters the optimiser state with
``load_optimizer_state``; resuming on one process reads the same files as any checkpoint.
"""

from __future__ import annotations

import torch


def blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: modules of a class named in its ``_no_split_modules``, else (Marian names
    none) the members of its ``nn.ModuleList`` s (``encoder.layers``, ``decoder.layers``).

    Raises:
        ValueError: a model with neither (FSDP would then hold it as one piece).
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        found = [m for lst in model.modules() if isinstance(lst, torch.nn.ModuleList) for m in lst]
    if not found:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to shard (no _no_split_modules, no "
                         "nn.ModuleList of layers)")
    return found


def shard(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` every block of ``model``, then ``model`` (in place); returns it."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _trainable_names(model) -> list[str]:
    """Parameter names in the order the optimiser holds them (``train._optimizer``: trainable parameters)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 (CPU; empty elsewhere), a tied weight once under its first name (as
    ``save_pretrained`` of the unsharded model writes it). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options())
    keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}  # tied: first name
    return {k: v for k, v in full.items() if k in keep}


def full_optimizer_state(model, optimizer) -> dict:
    """The whole optimiser state on rank 0 in the layout of ``optimizer.state_dict()`` of one process (parameters by
    index), empty elsewhere. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_options())
    if not full:
        return {}
    index = {name: i for i, name in enumerate(_trainable_names(model))}
    return {"state": {index[name]: value for name, value in full["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]}


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Scatter a single-process ``optimizer.state_dict()`` (parameters by index) into the sharded ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _trainable_names(model)
    by_name = {"state": {names[int(i)]: value for i, value in state["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=by_name,
                             options=StateDictOptions(full_state_dict=True))
