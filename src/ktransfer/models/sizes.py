"""A model folder's ``config.json`` checked before anything is allocated for it.

Every size key it sets (``vocab_size``, ``hidden_size``/``d_model``/``n_embd``, the layer counts, the feed-forward
widths, heads and positions) must be a positive integer within ``LIMITS``; the parameter count they imply (a lower
estimate: the embedding plus, per layer, attention and feed-forward matrices) times the bytes per weight must fit in
the memory available (``MemAvailable``, or ``KTRANSFER_MAX_MODEL_BYTES`` when set). A config of
``num_hidden_layers = 10**6`` or ``vocab_size = 1e9`` is so one line naming the file and key, not minutes of
allocation ending in the OOM killer.
"""

from __future__ import annotations

import os
from pathlib import Path

SIZE_KEYS = ("vocab_size", "hidden_size", "d_model", "n_embd", "num_hidden_layers", "n_layer", "num_layers",
             "encoder_layers", "decoder_layers", "intermediate_size", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner",
             "num_attention_heads", "n_head", "encoder_attention_heads", "decoder_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "n_positions")
HIDDEN, LAYERS, FFN = ("hidden_size", "d_model", "n_embd"), ("num_hidden_layers", "n_layer", "num_layers"), \
    ("intermediate_size", "encoder_ffn_dim", "n_inner")
HALF = ("float16", "bfloat16")
# Far beyond any published model (vocabularies of ~262k, widths of ~25k, ~128 layers, contexts of ~10M): a value
# over one of these is a broken or hostile config, refused whatever memory there is. Python's per-module overhead
# makes 10**6 tiny layers cost gigabytes that a parameter count does not show.
LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 17, "d_model": 1 << 17, "n_embd": 1 << 17,
          "num_hidden_layers": 4096, "n_layer": 4096, "num_layers": 4096, "encoder_layers": 4096,
          "decoder_layers": 4096, "intermediate_size": 1 << 20, "encoder_ffn_dim": 1 << 20, "decoder_ffn_dim": 1 << 20,
          "n_inner": 1 << 20, "num_attention_heads": 4096, "n_head": 4096, "encoder_attention_heads": 4096,
          "decoder_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 1 << 16,
          "max_position_embeddings": 1 << 28, "n_positions": 1 << 28}


def available_bytes() -> int:
    """``KTRANSFER_MAX_MODEL_BYTES`` if set, else the memory the kernel says is available (MemAvailable)."""
    limit = os.environ.get("KTRANSFER_MAX_MODEL_BYTES")
    if limit:
        return int(float(limit))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def _first(config: dict, keys: tuple[str, ...], default: int = 0) -> int:
    return next((int(config[k]) for k in keys if isinstance(config.get(k), int)), default)


def estimate_parameters(config: dict) -> int:
    """A lower estimate of the parameters a config implies: ``V H + L (4 H^2 + 2 H F)``."""
    H = _first(config, HIDDEN)
    L = _first(config, LAYERS) or _first(config, ("encoder_layers",)) + _first(config, ("decoder_layers",))
    F = _first(config, FFN, 0) or 4 * H
    return _first(config, ("vocab_size",)) * H + L * (4 * H * H + 2 * H * F)


def check_config(config: dict, file) -> None:
    """Refuse absurd sizes in a config dict read from ``file`` (see the module docstring).

    Raises:
        ValueError: ``FILE: KEY = VALUE: ...`` for a size that is not a positive integer, or the estimate against
            the memory available.
    """
    for key in SIZE_KEYS:
        if key not in config or config[key] is None:
            continue
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{file}: {key} = {value!r}: a size must be a positive integer")
        if value > LIMITS[key]:
            raise ValueError(f"{file}: {key} = {value:,}: beyond any real model (at most {LIMITS[key]:,} accepted)")
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    need = estimate_parameters(config) * (2 if dtype in HALF else 4)
    have = available_bytes()
    if need > have:
        dims = ", ".join(f"{k} = {config[k]}" for k in SIZE_KEYS if isinstance(config.get(k), int)
                         and k in ("vocab_size", *HIDDEN, *LAYERS, "encoder_layers", "decoder_layers", *FFN))
        raise ValueError(f"{file}: {dims} imply at least {need / 2**30:,.1f} GiB of weights, more than the "
                         f"{have / 2**30:,.1f} GiB of memory available (KTRANSFER_MAX_MODEL_BYTES to set the limit)")
