"""The chunk-size rule of the Python sweep (``ktransfer.losses.chunking``): cache-sized on a CPU, memory-sized on a GPU,
and the functions that use it."""

from __future__ import annotations

import pytest
import torch

import ktransfer
from ktransfer.losses import chunking

GiB = 2**30


def test_cuda_elements_known_points():
    assert chunking.cuda_chunk_elements(None) == 2**24  # free memory unknown
    assert chunking.cuda_chunk_elements(80 * GiB) == 2**26  # idle H100: the cap
    assert chunking.cuda_chunk_elements(1 * GiB) == 2**22  # 1 GiB / 8 / (8 temporaries x 4 bytes) = 2**22 exactly
    assert chunking.cuda_chunk_elements(0) == 2**20  # the floor
    assert chunking.cuda_chunk_elements(10**15) == 2**26


@pytest.mark.parametrize("free", [0, 1, 2**20, 3 * 2**27, GiB - 1, GiB, GiB + 1, 5 * GiB + 12345, 17 * GiB, 79 * GiB,
                                  2**40])
def test_cuda_elements_largest_power_of_two_that_fits(free):
    e = chunking.cuda_chunk_elements(free)
    assert e & (e - 1) == 0 and chunking.CUDA_MIN_ELEMENTS <= e <= chunking.CUDA_MAX_ELEMENTS
    per_element = chunking.CUDA_FREE_FRACTION * chunking.CUDA_TEMPORARIES * 4  # bytes of budget per element
    if chunking.CUDA_MIN_ELEMENTS < e < chunking.CUDA_MAX_ELEMENTS:
        assert e * per_element <= free < 2 * e * per_element  # fits, and twice as much would not
    elif e == chunking.CUDA_MAX_ELEMENTS:
        assert e * per_element <= free
    else:
        assert free < 2 * e * per_element


def test_cuda_elements_grow_with_free_memory():
    sizes = [chunking.cuda_chunk_elements(k * 2**26) for k in range(0, 4000, 7)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 7  # 2**20 ... 2**26


def test_rows_per_device():
    assert chunking.chunk_rows("cpu", 32000) == 2**17 // 32000 == 4
    assert chunking.chunk_rows("cpu", 200_000) == 1  # never 0
    assert chunking.chunk_rows("cpu", 128000, cpu_elements=2**23, min_cpu_rows=128) == 128  # the fused head's floor
    assert chunking.chunk_rows("cpu", 8000, cpu_elements=2**23, min_cpu_rows=128) == 1048
    assert chunking.chunk_rows("cuda", 128256, 80 * GiB) == 2**26 // 128256 == 523
    assert chunking.chunk_rows("cuda", 32000, None) == 2**24 // 32000
    assert chunking.chunk_rows("cuda", 32000, 1 * GiB) == 2**22 // 32000
    assert chunking.chunk_rows("cuda", 2**27, 80 * GiB) == 1
    assert chunking.chunk_rows("cuda", 128256, 80 * GiB, cpu_elements=1, min_cpu_rows=10**6) == 523  # CPU-only knobs
    assert chunking.chunk_rows("mps", 32000) == 2**24 // 32000


def test_cpu_device_reads_no_memory():
    assert chunking.available_memory(torch.device("cpu")) is None
    assert chunking.default_chunk_rows(torch.device("cpu"), 32000) == chunking.chunk_rows("cpu", 32000)


def test_divergence_and_fused_head_take_their_chunk_from_the_rule(monkeypatch):
    """float64 takes the Python path: it asks the rule for its chunk, and a 3-row chunk gives the one-chunk value."""
    calls = []
    rule = chunking.default_chunk_rows

    def spy(device, vocab, **kw):
        calls.append((device.type, vocab, kw))
        return 3

    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 50, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(10, 50, generator=g, dtype=torch.float64)
    whole = ktransfer.divergence(z, u, "jsd", chunk_size=10)
    monkeypatch.setattr(chunking, "default_chunk_rows", spy)
    chunked = ktransfer.divergence(z, u, "jsd")
    assert calls == [("cpu", 50, {})]
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
    h = torch.randn(10, 8, generator=g, dtype=torch.float64)
    W = torch.randn(50, 8, generator=g, dtype=torch.float64)
    fused = ktransfer.fused_linear_divergence(h, W, h, W.flip(0), "ka", lam=1.0).loss
    assert calls[1] == ("cpu", 50, {"cpu_elements": 2**23, "min_cpu_rows": 128})
    monkeypatch.setattr(chunking, "default_chunk_rows", rule)
    ref = ktransfer.fused_linear_divergence(h, W, h, W.flip(0), "ka", lam=1.0, chunk_size=10).loss
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=0)
