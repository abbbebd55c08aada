"""What a Hugging Face / TRL user expects of ktransfer's data, tokens, chat sequences, generation and CLI (issue 26):
HF split names, ``tokenizer(prompt)``'s own ids, one sequence per conversation, ``generate()`` equal to ktransfer's
decoding, and the CLI's help examples, flags and output folders. Built on the tiny Llama-style teacher of
``test_hf_models`` and Multi30k sentences."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_formats import _chat_rows, _pc_rows, _write_jsonl

from ktransfer.cli import main
from ktransfer.data import formats

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_args(data: Path, teacher: Path, out: Path, *extra) -> list[str]:
    return ["train", f"data.corpus={data}", f"model.teacher={teacher}", "model.preset=llama-tiny",
            "objective.kind=kd", "data.max_tokens=800", "data.max_length=120", "eval.max_length=8",
            "train.max_steps=1", "train.epochs=1", "train.num_threads=1", f"train.out_dir={out}", *extra]


# --------------------------------------------------------------------------------------------------------------
# Point 2: Hugging Face split names
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["validation", "valid", "val", "dev"])
def test_validation_split_names_are_found_in_jsonl_and_datasets_folders(multi30k_lines, tmp_path, name):
    from datasets import Dataset, DatasetDict

    lines = multi30k_lines
    folder = tmp_path / "jsonl"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", _pc_rows(lines, 20))
    _write_jsonl(folder / f"{name}.jsonl", _pc_rows(lines, 4, 100))
    DatasetDict({"train": Dataset.from_list(_pc_rows(lines, 20)),
                 name: Dataset.from_list(_pc_rows(lines, 4, 100))}).save_to_disk(str(tmp_path / "ds"))
    for corpus in (folder, tmp_path / "ds"):
        split, why = formats.find_split(corpus, "valid", "prompt_completion")
        assert split == name and repr(name) in why
        assert formats.find_split(corpus, "test", "prompt_completion", formats.TEST_NAMES)[0] is None
    # an explicit data.valid that exists wins over the HF names
    _write_jsonl(folder / "heldout.jsonl", _pc_rows(lines, 2, 200))
    assert formats.find_split(folder, "heldout", "prompt_completion")[0] == "heldout"
    assert formats.find_split(folder, "missing", "prompt_completion")[0] is None  # not an HF name: held out


def test_training_validates_on_the_datasetdict_validation_split_and_says_so(multi30k_lines, llama_folder, tmp_path):
    from datasets import Dataset, DatasetDict

    lines = multi30k_lines
    DatasetDict({"train": Dataset.from_list(_pc_rows(lines, 30)),
                 "validation": Dataset.from_list(_pc_rows(lines, 7, 100)),
                 "test": Dataset.from_list(_pc_rows(lines, 3, 200))}).save_to_disk(str(tmp_path / "ds"))
    run = tmp_path / "run"
    assert main(_train_args(tmp_path / "ds", llama_folder, run)) == 0
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "validation: split 'validation' (no 'valid'" in log and "held out" not in log
    assert "30 training and 7 validation examples" in log
    # an explicit data.valid wins
    run2 = tmp_path / "run2"
    assert main(_train_args(tmp_path / "ds", llama_folder, run2, "data.valid=test")) == 0
    assert "30 training and 3 validation examples" in (run2 / "train.log").read_text(encoding="utf-8")
    # evaluate on the run finds the same split
    assert main(["evaluate", str(run), "--beam", "1", "--max-length", "4", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "scores.validation.json").read_text())["examples"] == 7


# --------------------------------------------------------------------------------------------------------------
# Point 3b: one sequence per conversation
# --------------------------------------------------------------------------------------------------------------
# renders exactly as test_hf_models.CHAT_TEMPLATE, with TRL's {% generation %} blocks around the assistant's part
GENERATION_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}{{ m['content'] }}<|end|>"
    "{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _conversation(lines, turns: int, start: int = 0) -> list[dict]:
    messages = [{"role": "system", "content": "You translate German."}]
    for i in range(start, start + turns):
        messages += [{"role": "user", "content": lines["de"][i]}, {"role": "assistant", "content": lines["en"][i]}]
    return messages


def test_a_conversation_is_one_sequence_scored_on_every_assistant_turn(multi30k_lines, llama_folder):
    """A 4-turn conversation: one row, one learner and one teacher forward; its scored tokens are exactly TRL's
    ``assistant_only_loss`` tokens (``return_assistant_tokens_mask`` of a ``{% generation %}`` template), and its
    loss equals the loss of the per-turn rows (each turn after its whole history) within float tolerance."""
    import torch

    from ktransfer.data.corpora import IGNORE_INDEX
    from ktransfer.losses.objectives import transfer_loss
    from ktransfer.models.causal import CausalFamily, chat_ids, token_of
    from ktransfer.models.family import load_model
    from ktransfer.models.tokenizer import load_tokenizer

    tok = load_tokenizer(llama_folder)
    plain = tok.hf.apply_chat_template(_conversation(multi30k_lines, 4), tokenize=False)
    tok.hf.chat_template = GENERATION_TEMPLATE
    messages = _conversation(multi30k_lines, 4)
    assert tok.hf.apply_chat_template(messages, tokenize=False) == plain
    pairs = formats.to_pairs(formats.Examples("chat", [messages], ["hand-made"]), tok)
    assert len(pairs) == 1  # one example per conversation
    teacher, _ = load_model(llama_folder)
    learner, _ = load_model(llama_folder)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    family = CausalFamily()
    learner.config.ktransfer_instruction = ""
    prompts, responses = family.encode(pairs, tok, None, model=learner, fmt="chat")
    assert len(prompts) == 1
    # TRL's convention: the tokens inside the {% generation %} blocks are the scored ones
    trl = tok.hf.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids = [*prompts[0], *map(token_of, responses[0])]
    assert ids == list(trl["input_ids"])
    mine = [0] * len(prompts[0]) + [int(t >= 0) for t in responses[0]]
    assert mine == list(trl["assistant_masks"]) and sum(mine) > 0

    forwards = {"learner": 0, "teacher": 0}
    for name, m in (("learner", learner), ("teacher", teacher)):
        m.register_forward_hook(lambda *_, n=name: forwards.__setitem__(n, forwards[n] + 1))

    def loss_of(batch):
        with torch.no_grad():
            u, t = learner(**_inputs(batch)).logits, teacher(**_inputs(batch)).logits
        return transfer_loss(u.double(), t.double(), batch["labels"], objective="kd", lam=0.5)

    one = loss_of(family.collate(prompts, responses, learner, tok))
    assert forwards == {"learner": 1, "teacher": 1}
    # the per-turn formulation: one row per assistant turn, its whole history as the prompt, the turn scored
    rows = [chat_ids(tok, p, c) for p, c in formats.chat_turns(tok, messages)]
    per_turn = family.collate([p for p, _ in rows], [r for _, r in rows], learner, tok)
    assert len(rows) == 4 and sum(len(p) + len(r) for p, r in rows) > 2 * len(ids)  # quadratic in the turns
    many = loss_of(per_turn)
    assert int(one.num_tokens) == int(many.num_tokens) == int((per_turn["labels"] != IGNORE_INDEX).sum())
    for part in ("loss", "nll", "divergence"):
        assert float(getattr(one, part)) == pytest.approx(float(getattr(many, part)), rel=1e-6, abs=1e-9)


def _inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


# --------------------------------------------------------------------------------------------------------------
# Point 10: chat details: no second </s>, role markers kept
# --------------------------------------------------------------------------------------------------------------
LLAMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                  "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}")
IM_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("template", ["llama", "im_end"])
def test_no_second_end_of_sequence_after_the_templates_own_end_of_turn(multi30k_lines, llama_folder, template):
    from ktransfer.models.causal import CausalFamily, token_of
    from ktransfer.models.family import load_model
    from ktransfer.models.tokenizer import Tokenizer, load_tokenizer

    tok = load_tokenizer(llama_folder)
    if template == "llama":
        tok.hf.chat_template = LLAMA_TEMPLATE
        end = "</s>\n"
    else:
        tok.hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.hf.chat_template = IM_TEMPLATE
        tok = Tokenizer(tok.hf)
        end = "<|im_end|>\n"
    messages = [m for m in _conversation(multi30k_lines, 2) if m["role"] != "system"]
    model, _ = load_model(llama_folder)
    model.config.ktransfer_instruction = ""
    family = CausalFamily()
    prompts, responses = family.encode(formats.to_pairs(formats.Examples("chat", [messages]), tok), tok, None,
                                       model=model, fmt="chat")
    ids = [*prompts[0], *map(token_of, responses[0])]
    rendered = tok.hf.apply_chat_template(messages, tokenize=False)
    assert rendered.endswith(messages[-1]["content"] + end)
    # the sequence is the template's rendering, tokenized as the tokenizer does, nothing appended
    assert ids == tok.hf(rendered, add_special_tokens=False)["input_ids"]
    assert tok.hf.decode(ids, skip_special_tokens=False).endswith(end) and ids.count(tok.eos_id) == \
        rendered.count("</s>")
    # each assistant turn is scored up to and including the template's end of turn
    scored = tok.hf.decode([t for t in responses[0] if t >= 0], skip_special_tokens=False)
    assert scored.endswith(end)
    # generation stops at the end of turn: the model's generation_config names it
    family.prepare(model, tok, src_lang="", tgt_lang="", fmt="chat")
    stop = tok.token_to_id(end.strip())
    assert stop in ([model.generation_config.eos_token_id] if isinstance(model.generation_config.eos_token_id, int)
                    else model.generation_config.eos_token_id)


# --------------------------------------------------------------------------------------------------------------
# Point 4: tokens exactly as the tokenizer makes them
# --------------------------------------------------------------------------------------------------------------
def _trained(kind: str, lines, teacher: Path, tmp: Path) -> Path:
    data = tmp / "data"
    data.mkdir()
    if kind == "prompt_completion":
        _write_jsonl(data / "train.jsonl", _pc_rows(lines, 12))
        _write_jsonl(data / "valid.jsonl", _pc_rows(lines, 4, 100))
    elif kind == "chat":
        _write_jsonl(data / "train.jsonl", _chat_rows(lines, 12))
        _write_jsonl(data / "valid.jsonl", _chat_rows(lines, 4, 100))
    else:
        (data / "train.txt").write_text("\n".join(lines["en"][:12]) + "\n", encoding="utf-8")
        (data / "valid.txt").write_text("\n".join(lines["en"][100:104]) + "\n", encoding="utf-8")
    run = tmp / "run"
    assert main(_train_args(data, teacher, run)) == 0
    return run


@pytest.mark.parametrize("kind", ["prompt_completion", "chat", "text"])
def test_tokenizer_and_generate_of_the_checkpoint_equal_what_evaluate_saw(multi30k_lines, llama_folder, tmp_path,
                                                                           kind):
    """``tok(prompt)`` + plain ``model.generate()`` of the saved checkpoint give ``ktransfer evaluate``'s generations
    (no hidden ``<s>``); for text, evaluate's NLL is that of ``tok(text)``'s ids computed here in float64."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines = multi30k_lines
    run = _trained(kind, lines, llama_folder, tmp_path)
    assert main(["evaluate", str(run), "--beam", "1", "--max-length", "8", "--out", str(tmp_path / "ev")]) == 0
    scores = json.loads((tmp_path / "ev" / "scores.valid.json").read_text())
    got = [json.loads(x) for x in (tmp_path / "ev" / "generations.valid.jsonl").read_text().splitlines()]
    ckpt = run / "checkpoints" / "best"
    tok, model = AutoTokenizer.from_pretrained(ckpt), AutoModelForCausalLM.from_pretrained(ckpt).eval()
    if kind == "text":
        total, count = 0.0, 0
        for text in lines["en"][100:104]:
            ids = [*tok(text)["input_ids"], tok.eos_token_id]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            total -= sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1))
            count += len(ids) - 1
        assert got == [] and scores["tokens"] == count
        assert scores["nll"] == pytest.approx(total / count, rel=1e-5)
        return
    if kind == "prompt_completion":
        inputs = [tok(r["prompt"], return_tensors="pt") for r in _pc_rows(lines, 4, 100)]
        from ktransfer.models.causal import CausalFamily
        from ktransfer.models.family import load_model

        learner, ktok = load_model(ckpt)
        prompts, _ = CausalFamily().encode([(r["prompt"], r["completion"]) for r in _pc_rows(lines, 4, 100)], ktok,
                                           None, model=learner, fmt="prompt_completion")
        assert prompts == [x["input_ids"][0].tolist() for x in inputs]  # nothing added: no hidden <s>
    else:
        inputs = [tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, return_dict=True,
                                          return_tensors="pt") for r in _chat_rows(lines, 4, 100)]
    want = []
    for x in inputs:
        with torch.no_grad():
            out = model.generate(**x, num_beams=1, do_sample=False, max_new_tokens=8)
        want.append(tok.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True))
    assert [g["generation"] for g in got] == want and len(got) == 4
    # the prompt written beside each generation is the one the model read, role markers and all
    assert [g["prompt"] for g in got] == [tok.decode(x["input_ids"][0]) for x in inputs]


# --------------------------------------------------------------------------------------------------------------
# Point 7: TransferGKDTrainer with a padded-vocabulary teacher; nll and divergence logged beside loss
# --------------------------------------------------------------------------------------------------------------
def _gkd_config(tmp_path):
    try:
        from trl.experimental.gkd import GKDConfig
    except ImportError:
        from trl import GKDConfig
    return GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                     max_steps=2, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", report_to=[],
                     save_strategy="no", use_cpu=True, bf16=False, seed=0, lmbda=0.0, max_new_tokens=4,
                     disable_tqdm=True, logging_steps=1)


def _gkd_run(tok, shared_data, tmp_path, teacher, **loss_kw):
    import hf_tiny
    import torch
    from test_integrations import _Recorder

    from ktransfer.integrations.gkd import TransferGKDTrainer

    args = _gkd_config(tmp_path)
    torch.manual_seed(0)
    trainer = type("T", (_Recorder, TransferGKDTrainer), {})(
        model=hf_tiny.gpt2(tok, 0), teacher_model=teacher, args=args, processing_class=tok,
        train_dataset=hf_tiny.chat_dataset(shared_data, 8), **loss_kw)
    trainer.train()
    return trainer


def test_transfer_gkd_trainer_takes_a_padded_teacher_and_logs_the_loss_parts(shared_data, tmp_path):
    pytest.importorskip("trl")
    import copy

    import hf_tiny
    import torch

    from ktransfer.integrations.gkd import GKDTrainer

    tok = hf_tiny.tokenizer(shared_data, vocab_size=800)
    assert len(tok) == 800
    teacher = hf_tiny.gpt2(tok, 1, n_layer=3, n_embd=48)
    padded = copy.deepcopy(teacher)
    padded.resize_token_embeddings(832, mean_resizing=False)  # 32 rows more, as a 64-multiple padded teacher
    with torch.no_grad():
        padded.lm_head.weight[800:].normal_(0, 1.0)  # rows no token has: they must not count
    assert padded.config.vocab_size == 832 and padded.get_output_embeddings().weight.shape[0] == 832
    with pytest.raises(ValueError, match="vocab_size"):  # TRL's own check, unchanged for the stock trainer
        GKDTrainer(model=hf_tiny.gpt2(tok, 0), teacher_model=padded, args=_gkd_config(tmp_path / "s"),
                   processing_class=tok, train_dataset=hf_tiny.chat_dataset(shared_data, 8))
    ours = _gkd_run(tok, shared_data, tmp_path / "a", padded, objective="kd", divergence_weight=0.5, vocab_size=800)
    assert padded.config.vocab_size == 832  # restored
    same = _gkd_run(tok, shared_data, tmp_path / "b", teacher, objective="kd", divergence_weight=0.5, vocab_size=800)
    assert len(ours.losses) == 2 and ours.losses == pytest.approx(same.losses, rel=1e-5)
    logged = [r for r in ours.state.log_history if "loss" in r]
    assert logged and all(r["nll"] > 0 and r["divergence"] > 0 for r in logged)
    for r in logged:  # the loss is its parts' mix: (1 - w) nll + w divergence
        assert r["loss"] == pytest.approx(0.5 * r["nll"] + 0.5 * r["divergence"], rel=1e-3)


# --------------------------------------------------------------------------------------------------------------
# Point 5: generation that matches generate(); `ktransfer generate`; translate on a chat learner
# --------------------------------------------------------------------------------------------------------------
def test_plain_generate_of_a_saved_marian_equals_ktransfer_translate(small_tokenizer, shared_data, tmp_path):
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from ktransfer.models.checkpoint import save_checkpoint
    from ktransfer.models.family import build_model

    torch.manual_seed(0)
    model = build_model("tiny", small_tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and p.requires_grad:
                p.normal_(0.0, 0.3)
    path = tmp_path / "run" / "checkpoints" / "best"
    save_checkpoint(path, model=model, tokenizer=small_tokenizer, config={"data": {"src_lang": "de", "tgt_lang": "en"}})
    sources = (shared_data / "multi30k-de-en" / "test2016.de").read_text(encoding="utf-8").splitlines()[:8]
    (tmp_path / "src.de").write_text("\n".join(sources) + "\n", encoding="utf-8")
    assert main(["translate", str(path), "-i", str(tmp_path / "src.de"), "-o", str(tmp_path / "hyp.en")]) == 0
    ours = (tmp_path / "hyp.en").read_text(encoding="utf-8").splitlines()
    plain = AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    config = plain.generation_config
    assert (config.num_beams, config.early_stopping, config.length_penalty) == (6, True, 1.0)
    want = []
    for s in sources:  # the source as a Marian tokenizer writes it: its ids and </s>
        ids = torch.tensor([[*small_tokenizer.encode(s), small_tokenizer.eos_id]])
        with torch.no_grad():
            out = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids))
        want.append(small_tokenizer.decode(out[0]))
    assert ours == want


def test_generate_command_applies_the_chat_template_and_translate_refuses_chat(multi30k_lines, llama_folder,
                                                                               tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = _trained("chat", multi30k_lines, llama_folder, tmp_path)
    prompts = [f"Translate: {s}" for s in multi30k_lines["de"][300:303]]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    assert main(["generate", str(run), "-i", str(tmp_path / "p.txt"), "-o", str(tmp_path / "g.jsonl"),
                 "--max-length", "6"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "g.jsonl").read_text(encoding="utf-8").splitlines()]
    ckpt = run / "checkpoints" / "best"
    tok, model = AutoTokenizer.from_pretrained(ckpt), AutoModelForCausalLM.from_pretrained(ckpt).eval()
    want = []
    for p in prompts:
        x = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=True,
                                    return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**x, num_beams=1, do_sample=False, max_new_tokens=6)
        want.append(tok.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True))
    assert [r["prompt"] for r in rows] == prompts and [r["generation"] for r in rows] == want
    capsys.readouterr()
    (tmp_path / "s.de").write_text(multi30k_lines["de"][0] + "\n", encoding="utf-8")
    assert main(["translate", str(run), "-i", str(tmp_path / "s.de")]) == 2
    assert "ktransfer generate" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Point 9: CLI rough edges
# --------------------------------------------------------------------------------------------------------------
def _help_examples(command: str, capsys) -> list[list[str]]:
    """The example command lines of ``ktransfer COMMAND --help`` (continuation lines joined, comments dropped), as
    argument lists after ``ktransfer``."""
    import shlex

    from ktransfer.cli import COMMANDS

    assert command in COMMANDS
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("ktransfer ") or line.startswith("torchrun ")) or "ktransfer" not in line:
            continue
        words = shlex.split(line.split("  #")[0].split(" | ")[0].split(" < ")[0].split(" > ")[0])
        if words[0] == "echo":
            continue
        out.append(words[words.index("ktransfer") + 1:] if "ktransfer" in words else words[1:])
    return out


@pytest.mark.parametrize("command", ["data", "train", "evaluate", "translate", "generate", "distill-data", "export",
                                     "reproduce", "report", "toy", "build-kernel"])
def test_every_help_example_parses_and_names_valid_settings(command, capsys):
    """Each example of each ``--help`` is a command line the parser takes, with config keys that exist and no
    config file that does not exist; the cheap ones (listing, checking a corpus, the key table) also run."""
    from ktransfer.cli import build_parser
    from ktransfer.training.config import load_config

    examples = _help_examples(command, capsys)
    for argv in examples:
        try:
            args = build_parser(argv[0]).parse_args(argv)
        except SystemExit:
            pytest.fail(f"`ktransfer {' '.join(argv)}` from `ktransfer {command} --help` does not parse")
        items = getattr(args, "items", None) or []
        if argv[0] == "train":
            load_config(None, [i for i in items if "=" in i])  # every key exists and every value is valid
            assert not [i for i in items if i.endswith((".yaml", ".yml")) and not Path(i).is_file()], argv
    runnable = {"data": [["data", "list"], ["data", "check", "multi30k-de-en"]], "train": [["train", "--help-config"]]}
    for argv in runnable.get(command, []):
        assert argv in examples
        assert main(argv) == 0


def test_train_help_cites_no_missing_file(capsys):
    examples = _help_examples("train", capsys)
    assert examples and not any("configs/teacher.yaml" in " ".join(a) for a in examples)
    # the LoRA example line is one command (its continuation joined), not two broken ones
    assert any("model.lora_r=16" in a and "model.init=small-llama/" in a for a in examples)


def test_data_check_takes_the_data_keys_of_train(multi30k_lines, tmp_path, capsys):
    rows = [{"q": r["prompt"], "a": r["completion"]} for r in _pc_rows(multi30k_lines, 5)]
    path = _write_jsonl(tmp_path / "qa.jsonl", rows)
    assert main(["data", "check", str(path)]) == 1
    assert "data.prompt_key" in capsys.readouterr().err  # the error tells the user which keys to set ...
    assert main(["data", "check", str(path), "data.prompt_key=q", "data.completion_key=a"]) == 0  # ... and they work
    out = capsys.readouterr().out
    assert "prompt_completion" in out and "train: 5 examples" in out
    assert main(["data", "check", str(path), "train.epochs=3"]) == 2  # only data.* keys
    assert "data check takes data.KEY=VALUE" in capsys.readouterr().err


def test_distill_data_error_names_the_cli_flags(tmp_path, capsys, multi30k_lines):
    from test_hf_models import marian_teacher

    teacher = marian_teacher(tmp_path / "marian", multi30k_lines)  # a Hugging Face folder: no run config
    assert main(["distill-data", str(teacher), "--out", str(tmp_path / "o")]) == 2
    assert "--corpus" in capsys.readouterr().err
    assert main(["distill-data", str(teacher), "--corpus", "multi30k-de-en", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--src-lang" in err and "--tgt-lang" in err


def test_evaluate_a_model_folder_writes_in_the_current_directory_and_limit_counts_examples(
        multi30k_lines, llama_folder, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    rows = _chat_rows(multi30k_lines, 10)  # every other conversation has two turns
    for r in rows:  # short turns: every conversation fits in the model's 128 positions
        r["messages"] = [{**m, "content": " ".join(m["content"].split()[:4])} for m in r["messages"]]
    _write_jsonl(data / "valid.jsonl", rows)
    before = sorted(p.name for p in llama_folder.parent.iterdir())
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["evaluate", str(llama_folder), "--corpus", str(data), "--split", "valid", "--beam", "1",
                 "--max-length", "4", "--limit", "5"]) == 0
    assert sorted(p.name for p in llama_folder.parent.iterdir()) == before  # nothing beside the model
    out = cwd / f"eval-{llama_folder.name}"
    scores = json.loads((out / "scores.valid.json").read_text())
    generations = (out / "generations.valid.jsonl").read_text().splitlines()
    assert scores["examples"] == 5 and len(generations) == 5  # 5 examples, not 7 turns
    # each generation continues the conversation before its last assistant turn, role markers kept
    first = json.loads(generations[1])
    assert first["prompt"].count("<|user|>") == 2 and first["prompt"].endswith("<|assistant|>")
