"""Marian presets, building for a tokenizer, parameter counts, generation, and teacher/learner compatibility."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from ktransfer.models.family import PRESETS, build_model, check_compatible, count_parameters, describe_presets
from ktransfer.models.seq2seq import PRESETS as SEQ2SEQ_PRESETS
from ktransfer.models.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def corpus(shared_data) -> dict[str, list[str]]:
    out = {}
    for lang in ("de", "en"):
        with open(shared_data / "multi30k-de-en" / f"train.{lang}", encoding="utf-8") as f:
            out[lang] = f.read().splitlines()[:1200]
    return out


def _lines(corpus, start: int, stop: int) -> list[str]:
    return corpus["de"][start:stop] + corpus["en"][start:stop]


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(_lines(corpus, 0, 300), vocab_size=500)


# The table the brief pins: (encoder layers, decoder layers, d_model, heads).
EXPECTED = {
    "paper-deen-learner": (6, 1, 512, 4),
    "paper-deen-teacher": (6, 6, 1024, 16),
    "paper-then-learner": (1, 1, 128, 1),
    "paper-then-teacher": (3, 1, 256, 2),
    "cpu-teacher": (3, 3, 256, 4),
    "tiny": (1, 1, 32, 2),
}
V10K = SimpleNamespace(vocab_size=10000, pad_id=0, eos_id=1, bos_id=None)  # a 10K joint BPE vocabulary, as in the paper


def _meta_model(name, tokenizer=V10K, **overrides):
    with torch.device("meta"):  # shapes and counts without allocating 187M parameters
        return build_model(name, tokenizer, **overrides)


@pytest.mark.parametrize("name", list(SEQ2SEQ_PRESETS))
def test_preset_architecture(name):
    m = _meta_model(name)
    c = m.config
    if name in EXPECTED:
        assert (c.encoder_layers, c.decoder_layers, c.d_model, c.encoder_attention_heads) == EXPECTED[name]
    assert len(m.model.encoder.layers) == c.encoder_layers and len(m.model.decoder.layers) == c.decoder_layers
    assert c.encoder_ffn_dim == c.decoder_ffn_dim == 4 * c.d_model
    assert c.decoder_attention_heads == c.encoder_attention_heads
    assert c.dropout == 0.3 and c.scale_embedding and c.max_position_embeddings == 256
    assert c.share_encoder_decoder_embeddings and c.tie_word_embeddings
    assert (c.vocab_size, c.pad_token_id, c.eos_token_id, c.decoder_start_token_id) == (10000, 0, 1, 0)
    # one matrix for source embeddings, target embeddings and the output layer
    assert m.model.encoder.embed_tokens.weight is m.model.shared.weight
    assert m.model.decoder.embed_tokens.weight is m.model.shared.weight
    assert m.lm_head.weight is m.model.shared.weight


def _hand_count(V, d, f, enc, dec):
    attn = 4 * (d * d + d)  # q, k, v, out projections with biases
    ffn = (d * f + f) + (f * d + d)
    enc_layer = attn + ffn + 2 * 2 * d  # 2 layer norms
    dec_layer = 2 * attn + ffn + 3 * 2 * d  # self + cross attention, 3 layer norms
    return V * d + enc * enc_layer + dec * dec_layer  # sinusoidal positions do not train


def test_parameter_counts_by_hand():
    counts = {name: count_parameters(_meta_model(name)) for name in SEQ2SEQ_PRESETS}
    for name, n in counts.items():
        print(f"{name:20s} {n / 1e6:8.2f}M trainable parameters (V=10000)")
    assert counts["paper-deen-learner"] == _hand_count(10000, 512, 2048, 6, 1) == 28_238_336
    for name, kw in SEQ2SEQ_PRESETS.items():
        want = _hand_count(10000, kw["d_model"], kw["encoder_ffn_dim"], kw["encoder_layers"], kw["decoder_layers"])
        assert counts[name] == want, name
    assert counts["cpu-learner"] < counts["cpu-teacher"] / 3
    assert counts["paper-deen-learner"] < counts["paper-deen-teacher"]
    assert counts["paper-then-learner"] < counts["paper-then-teacher"]
    m = _meta_model("tiny")
    positions = 2 * 256 * 32
    assert count_parameters(m, trainable_only=False) == counts["tiny"] + positions


def test_overrides():
    m = _meta_model("cpu-teacher", layers=2, dropout=0.1)
    assert (m.config.encoder_layers, m.config.decoder_layers, m.config.dropout) == (2, 2, 0.1)
    m = _meta_model("tiny", d_model=64, heads=4)
    assert (m.config.d_model, m.config.encoder_ffn_dim, m.config.decoder_attention_heads) == (64, 256, 4)
    m = _meta_model("tiny", d_model=64, ffn_dim=100)
    assert m.config.decoder_ffn_dim == 100
    with pytest.raises(ValueError, match="unknown model override 'depth'"):
        _meta_model("tiny", depth=3)
    with pytest.raises(ValueError, match="not divisible"):
        _meta_model("tiny", heads=3)
    with pytest.raises(ValueError, match="dropout must be in"):
        _meta_model("tiny", dropout=1.5)
    with pytest.raises(ValueError, match="encoder_layers must be a positive integer"):
        _meta_model("tiny", encoder_layers=0)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="unknown model preset 'base'.*cpu-learner.*tiny"):
        build_model("base", V10K)


def test_vocab_and_ids_from_tokenizer(tok):
    m = build_model("tiny", tok)
    assert m.training
    assert m.config.vocab_size == tok.vocab_size == m.lm_head.weight.shape[0]
    g = m.generation_config
    assert (g.decoder_start_token_id, g.eos_token_id, g.pad_token_id) == (tok.pad_id, tok.eos_id, tok.pad_id)


def test_forward_logits_and_beam_search(tok):
    torch.manual_seed(0)
    m = build_model("tiny", tok).eval()
    rows = [tok.encode(s) + [tok.eos_id] for s in ("Ein Mann fährt Fahrrad.", "Hallo")]
    width = max(map(len, rows))
    src = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r in rows])  # [B, S]
    mask = (src != tok.pad_id).long()
    dec = torch.tensor([[tok.pad_id, 5, 6], [tok.pad_id, 7, 0]])
    logits = m(input_ids=src, attention_mask=mask, decoder_input_ids=dec).logits
    assert logits.shape == (2, 3, tok.vocab_size)  # [B, T, V]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no missing-generation-config or deprecation warnings
        out = m.generate(input_ids=src, attention_mask=mask, num_beams=6, max_length=12, length_penalty=1.0)
    assert out.shape[0] == 2 and out.shape[1] <= 12
    assert (out[:, 0] == tok.pad_id).all()  # decoding starts with pad (Marian's decoder start)
    assert isinstance(tok.decode(out[0]), str)


def test_build_from_hf_folder(tok, corpus, tmp_path):
    m = build_model("tiny", tok)
    m.save_pretrained(tmp_path / "hf")
    loaded = build_model(tmp_path / "hf", tok, dropout=0.1)
    assert loaded.config.dropout == 0.1
    assert torch.equal(loaded.model.shared.weight, m.model.shared.weight)
    bigger = train_tokenizer(_lines(corpus, 0, 300), vocab_size=600)
    with pytest.raises(ValueError, match="has 500 output rows but its tokenizer has 600 ids"):
        build_model(tmp_path / "hf", bigger)
    tok.save(tmp_path / "hf")  # with its tokenizer, a folder is checked against the given one
    with pytest.raises(ValueError, match=r"different vocabularies: id \d+ is .+ in model .+ vs .+ in given"):
        build_model(tmp_path / "hf", train_tokenizer(_lines(corpus, 600, 900), vocab_size=500))
    with pytest.raises(ValueError, match="only dropout overrides"):
        build_model(tmp_path / "hf", tok, d_model=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no model"):
        build_model(tmp_path / "empty", tok)


def test_check_compatible(tok, corpus):
    teacher, learner = _meta_model("cpu-teacher", tok), _meta_model("cpu-learner", tok)
    check_compatible(teacher, learner, tok, tok)

    small = train_tokenizer(_lines(corpus, 0, 300), vocab_size=400)
    with pytest.raises(ValueError, match=r"different vocabularies: id 4\d\d is .+ in teacher vs None in learner"):
        check_compatible(teacher, _meta_model("cpu-learner", small), tok, small)

    a = train_tokenizer(_lines(corpus, 0, 200), vocab_size=300)
    b = train_tokenizer(_lines(corpus, 1000, 1200), vocab_size=300)
    assert a.vocab_size == b.vocab_size == 300
    ta, lb = _meta_model("tiny", a), _meta_model("tiny", b)
    with pytest.raises(ValueError, match=r"different vocabularies: id \d+ is .+ in teacher vs .+ in learner"):
        check_compatible(ta, lb, a, b)

    bad = _meta_model("cpu-learner", tok)
    bad.config.eos_token_id = 2
    with pytest.raises(ValueError, match="learner model has eos_token_id=2 but its tokenizer's is 1"):
        check_compatible(teacher, bad, tok, tok)
    bad = _meta_model("cpu-learner", tok)
    bad.config.decoder_start_token_id = 1
    with pytest.raises(ValueError, match="decoder_start_token_id: teacher 0 vs learner 1"):
        check_compatible(teacher, bad, tok, tok)


def test_describe_presets():
    text = describe_presets()
    assert all(name in text for name in PRESETS)
