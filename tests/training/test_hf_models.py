"""Any Hugging Face teacher and tokenizer in, a Hugging Face learner out, with three real tokenizer types built
offline from Multi30k (no hub here):

- a Marian teacher with a SentencePiece ``MarianTokenizer`` in the opus-mt layout (``</s>`` = 0, ``<unk>`` = 1,
  ``<pad>`` last; separate source and target SentencePiece models over one vocabulary);
- a Llama-style fast tokenizer (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no pad, a chat template with special tokens);
- a GPT-2 byte-level BPE with one ``<|endoftext|>``.

For each, ``ktransfer train model.teacher=FOLDER model.preset=PRESET`` distils a learner sized to the teacher's
tokenizer, ``ktransfer evaluate`` scores it, and the learner reloads with ``AutoModelFor*.from_pretrained`` +
``AutoTokenizer`` and generates what ``ktransfer.evaluation.evaluate.translate`` gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ktransfer.cli import main
from ktransfer.models.tokenizer import Tokenizer, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CODE = "def f(x):\n    return  x + 1\n\n# done"


@pytest.fixture(scope="module")
def lines(shared_data) -> dict[str, list[str]]:
    folder = shared_data / "multi30k-de-en"
    return {lang: (folder / f"train.{lang}").read_text(encoding="utf-8").splitlines()[:2000] for lang in ("de", "en")}


# --------------------------------------------------------------------------------------------------------------
# Teachers with real tokenizer types
# --------------------------------------------------------------------------------------------------------------
def _spm(texts: list[str], prefix: Path, vocab_size: int) -> Path:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=vocab_size,
                                   model_type="unigram", character_coverage=1.0, bos_id=-1, eos_id=-1,
                                   unk_id=0, minloglevel=2)
    return prefix.with_suffix(".model")


def marian_teacher(folder: Path, lines) -> Path:
    """An opus-mt-style folder: source.spm, target.spm, vocab.json (</s> 0, <unk> 1, pieces, <pad> last), a tiny
    MarianMTModel whose pad is the decoder start."""
    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    work = folder.parent / f"{folder.name}-spm"
    work.mkdir(parents=True)
    src, tgt = _spm(lines["de"], work / "source", 400), _spm(lines["en"], work / "target", 400)
    pieces = []
    for model in (src, tgt):
        proc = spm.SentencePieceProcessor(model_file=str(model))
        pieces += [proc.id_to_piece(i) for i in range(proc.get_piece_size()) if not proc.is_unknown(i)]
    vocab = {"</s>": 0, "<unk>": 1}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    vocab["<pad>"] = len(vocab)
    (work / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tok = MarianTokenizer(source_spm=str(src), target_spm=str(tgt), vocab=str(work / "vocab.json"),
                          source_lang="de", target_lang="en")
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = MarianConfig(vocab_size=len(vocab), decoder_vocab_size=len(vocab), d_model=32, encoder_layers=1,
                          decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=vocab["<pad>"],
                          eos_token_id=0, decoder_start_token_id=vocab["<pad>"], forced_eos_token_id=0)
    MarianMTModel(config).save_pretrained(folder)
    return folder


def _fast(tok, folder: Path, **special) -> None:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, **special).save_pretrained(folder)


def llama_teacher(folder: Path, lines) -> Path:
    """A Llama-style fast tokenizer (<unk> 0, <s> 1, </s> 2, no pad, chat tokens special, whitespace kept) and a
    tiny LlamaForCausalLM."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = RustTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([*lines["de"], *lines["en"], CODE] * 1, trainer=trainer)
    _fast(tok, folder, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
          additional_special_tokens=specials[3:], chat_template=CHAT_TEMPLATE)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                         eos_token_id=2, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def gpt2_teacher(folder: Path, lines) -> Path:
    """A GPT-2 byte-level BPE with one <|endoftext|> (bos = eos = unk, no pad) and a tiny GPT2LMHeadModel."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*lines["de"], *lines["en"]], trainer=trainer)
    eot = "<|endoftext|>"
    _fast(tok, folder, bos_token=eot, eos_token=eot, unk_token=eot)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


TEACHERS = {"marian": (marian_teacher, "tiny"), "llama": (llama_teacher, "llama-tiny"),
            "gpt2": (gpt2_teacher, "gpt2-tiny")}


@pytest.fixture(scope="module", params=list(TEACHERS))
def teacher(request, lines, tmp_path_factory) -> tuple[str, Path, str]:
    make, preset = TEACHERS[request.param]
    return request.param, make(tmp_path_factory.mktemp(request.param) / "teacher", lines), preset


# --------------------------------------------------------------------------------------------------------------
# Tokenizers keep their own layout, specials and whitespace
# --------------------------------------------------------------------------------------------------------------
def test_special_ids_come_from_the_tokenizer(teacher):
    name, folder, _ = teacher
    tok = load_tokenizer(folder)
    want = {"marian": (0, tok.vocab_size - 1, None, 1), "llama": (2, 2, 1, 0), "gpt2": (0, 0, 0, 0)}[name]
    assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.unk_id) == want  # pad falls back to eos where there is none


def test_marian_target_side_uses_the_target_sentencepiece_model(lines, tmp_path):
    from transformers import AutoTokenizer

    folder = marian_teacher(tmp_path / "m", lines)
    tok, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    text = "A man in an orange hat starring at something."
    vocab = hf.get_vocab()
    for spm_model, target in ((hf.spm_source, False), (hf.spm_target, True)):  # each side its own SentencePiece
        pieces = spm_model.encode(text, out_type=str)
        assert tok.encode(text, target=target) == [vocab.get(p, vocab["<unk>"]) for p in pieces]
    assert tok.encode(text) == hf(text)["input_ids"][:-1]  # Marian appends </s>; ktransfer appends it itself
    assert tok.encode(text) != tok.encode(text, target=True)  # two SentencePiece models, one vocabulary
    assert tok.decode(tok.encode(text, target=True)) == text


@pytest.mark.parametrize("make", [llama_teacher, gpt2_teacher])
def test_whitespace_and_code_round_trip(make, lines, tmp_path):
    tok = load_tokenizer(make(tmp_path / "t", lines))
    assert tok.decode(tok.encode(CODE)) == CODE


def test_chat_special_tokens_are_single_ids(lines, tmp_path):
    tok = load_tokenizer(llama_teacher(tmp_path / "t", lines))
    text = tok.hf.apply_chat_template([{"role": "user", "content": "Hallo Welt"}], tokenize=False,
                                      add_generation_prompt=True)
    ids = tok.encode(text)
    for special in ("<|user|>", "<|end|>", "<|assistant|>"):
        assert ids.count(tok.token_to_id(special)) == 1
    assert ids[0] == tok.token_to_id("<|user|>") and ids[-1] == tok.token_to_id("<|assistant|>")


# --------------------------------------------------------------------------------------------------------------
# Distil, evaluate, reload with transformers, generate the same
# --------------------------------------------------------------------------------------------------------------
def _train_args(shared_data: Path, out: Path, folder: Path, preset: str) -> list[str]:
    return ["train", f"model.teacher={folder}", f"model.preset={preset}", "objective.kind=kd",
            f"data.corpus={shared_data / 'multi30k-de-en'}", "data.max_train_samples=120", "data.max_eval_samples=6",
            "data.max_tokens=600", "data.max_length=60", "eval.max_length=12", "eval.batch_size=8",
            "optim.lr=3e-3", "train.max_steps=3", "train.epochs=1", "train.num_threads=1", f"train.out_dir={out}"]


def test_distil_from_a_hugging_face_teacher_and_reload_with_transformers(teacher, shared_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from ktransfer.evaluation.evaluate import translate
    from ktransfer.models.family import CAUSAL, SEQ2SEQ, family_of, load_model

    name, folder, preset = teacher
    run = tmp_path / "run"
    assert main(_train_args(shared_data, run, folder, preset)) == 0
    best = run / "checkpoints" / "best"
    assert main(["evaluate", str(run), "--split", "valid", "--limit", "6", "--beam", "1", "--max-length", "12",
                 "--out", str(tmp_path / "eval")]) == 0
    assert len((tmp_path / "eval" / "hyp.valid.en").read_text(encoding="utf-8").splitlines()) == 6

    # the learner was sized to the teacher's tokenizer and kept it (no BPE trained)
    ours, tok = load_model(best)
    teacher_tok = load_tokenizer(folder)
    assert tok.fingerprint() == teacher_tok.fingerprint() and tok.vocab_size == teacher_tok.vocab_size
    assert "trained a joint BPE" not in (run / "train.log").read_text(encoding="utf-8")

    # what any transformers user does with the folder
    auto = AutoModelForSeq2SeqLM if family_of(ours) is SEQ2SEQ else AutoModelForCausalLM
    hf_model, hf_tok = auto.from_pretrained(best).eval(), AutoTokenizer.from_pretrained(best)
    sources = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch."]
    ktransfer_out = translate(ours, tok, sources, beam=1, max_length=10)
    for source, want in zip(sources, ktransfer_out, strict=True):
        if family_of(ours) is SEQ2SEQ:
            enc = hf_tok(source, return_tensors="pt")  # Marian / ktransfer's layout: the source + </s>
            out = hf_model.generate(**enc, max_length=11)[0, 1:]
        else:
            from ktransfer.models.causal import instruction, prompt_ids

            ids = prompt_ids(tok, tok.encode(instruction(ours)), tok.encode(source))
            out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=10)[0, len(ids):]
        got = hf_tok.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert got == want, (name, source)
    assert (family_of(ours) is CAUSAL) == (name != "marian")


def test_a_teacher_with_another_tokenizer_is_refused_naming_the_first_token(lines, shared_data, tmp_path):
    folder = gpt2_teacher(tmp_path / "gpt2", lines)
    other = llama_teacher(tmp_path / "llama", lines)
    args = _train_args(shared_data, tmp_path / "run", folder, "gpt2-tiny") + [f"data.tokenizer={other}"]
    from ktransfer.training.config import load_config
    from ktransfer.training.train import setup

    with pytest.raises(ValueError, match=r"model.teacher: .*different vocabularies: id 0 is '<\|endoftext\|>' in "
                                         r"teacher vs '<unk>' in learner"):
        setup(load_config(None, args[1:]))


def test_a_hub_id_without_network_is_one_clear_error(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    args = _train_args(shared_data, tmp_path / "run", Path("Helsinki-NLP/opus-mt-de-en"), "tiny")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.teacher: Helsinki-NLP/opus-mt-de-en" in err and "HF_HUB_OFFLINE" in err
    assert "Traceback" not in err


def test_a_folder_that_asks_for_remote_code_is_refused(lines, shared_data, tmp_path, capsys):
    folder = gpt2_teacher(tmp_path / "gpt2", lines)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    assert main(_train_args(shared_data, tmp_path / "run", folder, "gpt2-tiny")) == 2
    err = capsys.readouterr().err
    assert "auto_map" in err and "model.trust_remote_code=true" in err


def test_tokenizer_object_wraps_any_transformers_tokenizer(lines, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(llama_teacher(tmp_path / "t", lines))
    tok = Tokenizer(hf)
    assert tok.vocab_size == len(hf) and tok.encode("Hallo") == hf("Hallo", add_special_tokens=False)["input_ids"]
