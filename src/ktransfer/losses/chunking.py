"""How many rows (positions) one chunk of the Python sweep takes, on a CPU and on a GPU.

A chunk of c rows makes a few ``[c, V]`` float32 temporaries (both softmaxes, the terms, the gradient of the chunk).

- CPU: the chunk should stay in the L2/L3 caches, so a chunk holds a fixed number of elements (2**17 for
  ``divergence``, 2**23 for the fused head, whose weight-gradient traffic wants more rows; see their modules).
- GPU: the cost is kernel launches (each chunk is ~30 small kernels), not cache misses: on an H100, 2**17-element
  chunks made the sweep ~100x slower than the unchunked composition (docs/benchmarks.md). A chunk therefore takes as
  many elements as memory allows: the largest power of two such that ``CUDA_TEMPORARIES`` float32 temporaries fit in
  ``CUDA_FREE_FRACTION`` of the device's available memory (free in the driver plus what PyTorch's caching allocator
  holds unused), clamped to [2**20, 2**26] elements. An idle 80 GB GPU gets 2**26 (256 MiB per temporary, ~2 GiB in
  all; 523 rows at V = 128256); a GPU with 1 GiB left gets 2**22. Powers of two keep the number of distinct chunk
  shapes small. When the free memory cannot be read the chunk is 2**24 elements.

Values do not depend on the chunk size beyond float rounding (each row is computed on its own; sums over rows and the
fused head's weight gradient are accumulated chunk by chunk). Pass ``chunk_size=`` to fix it.
"""

from __future__ import annotations

import torch

# divergence(): elements per chunk on a CPU (512 KiB per float32 temporary; bench/divergence.py).
CPU_ELEMENTS = 1 << 17
# GPU: the rule above.
CUDA_ELEMENTS_UNKNOWN = 1 << 24
CUDA_MIN_ELEMENTS = 1 << 20
CUDA_MAX_ELEMENTS = 1 << 26
CUDA_TEMPORARIES = 8  # float32 [c, V] temporaries alive at once in one chunk (an upper estimate of _sweep_chunk's)
CUDA_FREE_FRACTION = 8  # the temporaries may take 1/8 of the available memory


def cuda_chunk_elements(available_bytes: int | None) -> int:
    """Elements per ``[c, V]`` temporary of a GPU chunk, given the device's available memory in bytes (None: unknown).

    The largest power of two ``e`` with ``CUDA_TEMPORARIES * 4 * e <= available_bytes / CUDA_FREE_FRACTION``, clamped
    to [``CUDA_MIN_ELEMENTS``, ``CUDA_MAX_ELEMENTS``]; ``CUDA_ELEMENTS_UNKNOWN`` when ``available_bytes`` is None.
    """
    if available_bytes is None:
        return CUDA_ELEMENTS_UNKNOWN
    fit = int(available_bytes) // (CUDA_FREE_FRACTION * CUDA_TEMPORARIES * 4)
    if fit < CUDA_MIN_ELEMENTS:
        return CUDA_MIN_ELEMENTS
    return min(CUDA_MAX_ELEMENTS, 1 << (fit.bit_length() - 1))


def chunk_rows(device_type: str, vocab: int, available_bytes: int | None = None, *,
               cpu_elements: int = CPU_ELEMENTS, min_cpu_rows: int = 1) -> int:
    """Rows per chunk for ``[N, vocab]`` logits on a device of type ``device_type`` (a pure function).

    ``"cpu"``: ``max(min_cpu_rows, cpu_elements // vocab)``; ``"cuda"``: ``cuda_chunk_elements(available_bytes) //
    vocab``; other devices (mps, ...): ``CUDA_ELEMENTS_UNKNOWN // vocab``. Always at least 1.
    """
    if device_type == "cpu":
        return max(1, min_cpu_rows, cpu_elements // vocab)
    per_chunk = cuda_chunk_elements(available_bytes) if device_type == "cuda" else CUDA_ELEMENTS_UNKNOWN
    return max(1, per_chunk // vocab)


def available_memory(device: torch.device) -> int | None:
    """Bytes a new tensor on ``device`` can take: the driver's free memory plus what PyTorch's caching allocator has
    reserved but not allocated. None for a non-CUDA device or when it cannot be read."""
    if device.type != "cuda":
        return None
    try:
        free, _total = torch.cuda.mem_get_info(device)
        return int(free) + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    except (RuntimeError, AssertionError):  # no driver / not initialised
        return None


def default_chunk_rows(device: torch.device, vocab: int, *, cpu_elements: int = CPU_ELEMENTS,
                       min_cpu_rows: int = 1) -> int:
    """``chunk_rows`` for tensors on ``device``, reading the GPU's available memory now."""
    return chunk_rows(device.type, vocab, available_memory(device), cpu_elements=cpu_elements,
                      min_cpu_rows=min_cpu_rows)
