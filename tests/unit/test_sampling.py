"""The on-policy sampler (``ktransfer.models.sampling``): its draws follow the softmax of the logits (with temperature,
top-k and top-p truncation) by a chi-square test on 10^5 draws per row; a test that a slightly wrong distribution
fails (the test has power); the families' KV-cached sampling gives exactly the tokens of a sampler that recomputes
the whole forward pass at every step with the same uniforms (``tests/sampling_reference.py``), feeding one token a
step after the first; determinism per seed; the reference-bounded length rule.

Tiny models (``tiny`` Marian, ``gpt2-tiny``, ``llama-tiny``), one thread.
"""

from __future__ import annotations

import math

import pytest
import torch
from sampling_reference import distribution, naive_sample

from ktransfer.data import batching
from ktransfer.data.corpora import read_split
from ktransfer.models import causal, sampling
from ktransfer.models.family import CAUSAL, SEQ2SEQ, build_model
from ktransfer.models.generation import suppressed_ids
from ktransfer.training.prefixes import SampleSettings

pytestmark = pytest.mark.usefixtures("one_thread")

N_DRAWS = 100_000


def chi_square_p(counts: torch.Tensor, probs: list[float]) -> float:
    """p-value of Pearson's chi-square of ``counts`` against ``probs`` (categories of probability 0 must be empty,
    checked by the caller); the upper regularised incomplete gamma function gives the chi-square tail."""
    n = float(counts.sum())
    cells = [(float(c), p * n) for c, p in zip(counts.tolist(), probs, strict=True) if p > 0]
    stat = sum((c - e) ** 2 / e for c, e in cells)
    df = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


ROWS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.7, 0, 0.9),
    (1.3, 5, 1.0),
    (1.0, 12, 0.8),
    (2.0, 0, 0.5),
]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), ROWS)
def test_draws_follow_the_truncated_softmax(temperature, top_k, top_p):
    """10^5 draws on a fixed row of 40 logits (ids 3 and 7 suppressed): no draw outside the support, and Pearson's
    chi-square against the float64 reference distribution gives p > 1e-3 (fixed seeds: the test is deterministic);
    against the distribution of temperature x 1.1 it gives p < 1e-6 (the test would see a wrong sampler)."""
    gen = torch.Generator().manual_seed(11)
    row = torch.randn(40, generator=gen)
    suppressed = [3, 7]
    logits = row.index_fill(0, torch.tensor(suppressed), float("-inf")).expand(N_DRAWS, -1)
    u = torch.rand(N_DRAWS, generator=gen, dtype=torch.float64)
    tokens = sampling.inverse_cdf(logits, u, temperature=temperature, top_k=top_k, top_p=top_p)
    counts = torch.bincount(tokens, minlength=40)
    probs = distribution(row.tolist(), temperature, top_k, top_p, suppressed)
    assert all(int(c) == 0 for c, p in zip(counts, probs, strict=True) if p == 0)
    assert sum(p > 0 for p in probs) >= 2
    assert chi_square_p(counts, probs) > 1e-3
    wrong = distribution(row.tolist(), temperature * 1.1, top_k, top_p, suppressed)
    support = [p if q > 0 else 0.0 for p, q in zip(wrong, probs, strict=True)]
    assert chi_square_p(counts, [p / sum(support) for p in support]) < 1e-6


def test_inverse_cdf_edges():
    """u = 0 takes the first token of positive probability, u just below 1 the last; a single-token support always
    gives that token; top_k = 1 is the argmax."""
    logits = torch.tensor([[-math.inf, 0.0, 1.0, -math.inf]] * 2 + [[5.0, -math.inf, -math.inf, -math.inf]] * 2)
    u = torch.tensor([0.0, 1 - 2.0 ** -53, 0.0, 0.999], dtype=torch.float64)
    assert sampling.inverse_cdf(logits, u).tolist() == [1, 2, 0, 0]
    x = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampling.inverse_cdf(x, torch.rand(6, dtype=torch.float64), top_k=1), x.argmax(-1))


def test_row_limits_follow_the_reference():
    labels = torch.full((3, 10), -100)
    labels[0, :4], labels[1, 2:9], labels[2, :1] = 1, 1, 1  # 4, 7 and 1 reference tokens
    assert sampling.row_limits(labels, 256, 2.0, 8).tolist() == [16, 22, 10]
    assert sampling.row_limits(labels, 20, 2.0, 8).tolist() == [16, 20, 10]
    assert sampling.row_limits(labels, 20, 1.5, 0).tolist() == [6, 11, 2]
    assert sampling.row_limits(labels, 20, None, 8).tolist() == [20, 20, 20]


# --------------------------------------------------------------------------------------------------------------
# The families: KV-cached sampling == a full forward pass at every step
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pairs(shared_data):
    return read_split(shared_data / "multi30k-de-en", "valid", "de", "en")[:6]


def _widths(model):
    """Records the sequence width of every forward call of ``model`` (decoder side for an encoder-decoder)."""
    widths = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("decoder_input_ids", kwargs.get("input_ids"))
        widths.append(ids.shape[1])

    return widths, model.register_forward_pre_hook(hook, with_kwargs=True)


SETTINGS = [SampleSettings(temperature=1.0, max_new_tokens=9, seed=5, length_scale=0.5, length_margin=2),
            SampleSettings(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=7, seed=6)]


@pytest.mark.parametrize("settings", SETTINGS)
def test_seq2seq_cached_sampling_equals_full_recomputation(small_tokenizer, pairs, settings):
    tok = small_tokenizer
    torch.manual_seed(0)
    model = build_model("tiny", tok, dropout=0.0).train()
    src = [tok.encode(s) + [tok.eos_id] for s, _ in pairs]
    tgt = [tok.encode(t) + [tok.eos_id] for _, t in pairs]
    batch = batching.collate(src, tgt, tok.pad_id, tok.pad_id)
    rng = torch.get_rng_state()
    widths, handle = _widths(model)
    out = SEQ2SEQ.on_policy_batch(model, tok, batch, settings)
    handle.remove()
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert widths == [1] * len(widths)  # one decoder token a step: the cache holds the rest
    limits = sampling.row_limits(batch["labels"], settings.max_new_tokens, settings.length_scale,
                                 settings.length_margin).tolist()

    model.eval()

    def last_logits(rows):
        width = max(map(len, rows)) + 1
        dec = torch.tensor([[tok.pad_id, *r] + [tok.pad_id] * (width - 1 - len(r)) for r in rows])
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         decoder_input_ids=dec).logits[:, -1]

    rows = naive_sample(last_logits, len(src), limits, eos_id=tok.eos_id, seed=settings.seed,
                        temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                        suppressed=suppressed_ids(model, tok))
    for b, row in enumerate(rows):
        assert len(row) <= limits[b]
        assert out["labels"][b, :len(row)].tolist() == row and (out["labels"][b, len(row):] == -100).all()
        assert out["decoder_input_ids"][b, :len(row)].tolist() == [tok.pad_id, *row[:-1]]
    assert any(len(r) == lim for r, lim in zip(rows, limits, strict=True))  # an untrained model runs to its limit
    again = SEQ2SEQ.on_policy_batch(model, tok, batch, settings)
    other = SEQ2SEQ.on_policy_batch(model, tok, batch, SampleSettings(**{**settings.__dict__, "seed": 99}))
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert not torch.equal(other["labels"][:, :3], out["labels"][:, :3])


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
@pytest.mark.parametrize("settings", SETTINGS)
def test_causal_cached_sampling_equals_full_recomputation(small_tokenizer, pairs, preset, settings):
    tok = small_tokenizer
    torch.manual_seed(1)
    model = build_model(preset, tok, dropout=0.0).train()
    causal.ensure_instruction(model, "de", "en")
    batch = causal.collate(*causal.encode_examples(pairs, tok, 200, instruction=causal.instruction(model),
                                                   log=lambda _: None), tok.pad_id)
    widths, handle = _widths(model)
    out = CAUSAL.on_policy_batch(model, tok, batch, settings)
    handle.remove()
    prompts = causal.prompts_of(batch)
    assert widths[0] == max(map(len, prompts)) and widths[1:] == [1] * (len(widths) - 1)
    limits = sampling.row_limits(batch["labels"], settings.max_new_tokens, settings.length_scale,
                                 settings.length_margin).tolist()

    model.eval()

    def last_logits(rows):
        seqs = [[*p, *r] for p, r in zip(prompts, rows, strict=True)]
        width = max(map(len, seqs))
        ids = torch.tensor([[tok.pad_id] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask,
                         position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]

    rows = naive_sample(last_logits, len(prompts), limits, eos_id=tok.eos_id, seed=settings.seed,
                        temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                        suppressed=suppressed_ids(model, tok))
    assert causal.prompts_of(out) == prompts
    for b, row in enumerate(rows):
        assert out["labels"][b][out["labels"][b] != -100].tolist() == row
