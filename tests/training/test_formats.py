"""Data as LLM and MT people keep it (``ktransfer.data.formats``): prompt/completion JSONL, chat messages, plain text
and
``datasets`` folders, built here from Multi30k sentences. Reading and its errors, which tokens the loss covers
(checked against the chat template's own rendering), whitespace, and a causal learner distilled end to end on each
format with a Llama-style tokenizer that has a chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_hf_models import CODE

from ktransfer.cli import main
from ktransfer.data import formats
from ktransfer.data.corpora import IGNORE_INDEX, CorpusError
from ktransfer.models.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lines(multi30k_lines) -> dict[str, list[str]]:
    return multi30k_lines


@pytest.fixture(scope="module")
def teacher(llama_folder) -> Path:
    return llama_folder


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _pc_rows(lines, n, start=0):
    return [{"prompt": f"Übersetze:\n{de}\n", "completion": en}
            for de, en in zip(lines["de"][start:start + n], lines["en"][start:start + n], strict=True)]


def _chat_rows(lines, n, start=0):
    rows = []
    for i in range(start, start + n):
        de, en, de2, en2 = lines["de"][i], lines["en"][i], lines["de"][i + 1000], lines["en"][i + 1000]
        messages = [{"role": "user", "content": f"Translate: {de}"}, {"role": "assistant", "content": en}]
        if i % 2:  # every other conversation has a second turn
            messages += [{"role": "user", "content": f"And: {de2}"}, {"role": "assistant", "content": en2}]
        rows.append({"messages": messages})
    return rows


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------
def test_formats_are_inferred_from_path_and_columns(lines, shared_data, tmp_path):
    from datasets import Dataset, DatasetDict

    keys = formats.Keys()
    assert formats.infer_format(_write_jsonl(tmp_path / "a.jsonl", _pc_rows(lines, 3)), keys)[0] == "prompt_completion"
    assert formats.infer_format(_write_jsonl(tmp_path / "b.jsonl", _chat_rows(lines, 3)), keys)[0] == "chat"
    assert formats.infer_format(_write_jsonl(tmp_path / "c.jsonl", [{"text": s} for s in lines["en"][:3]]),
                                keys)[0] == "text"
    (tmp_path / "d.txt").write_text("\n".join(lines["en"][:3]), encoding="utf-8")
    assert formats.infer_format(tmp_path / "d.txt", keys)[0] == "text"
    assert formats.infer_format(shared_data / "multi30k-de-en", keys)[0] == "parallel"
    DatasetDict({"train": Dataset.from_list(_chat_rows(lines, 4)),
                 "valid": Dataset.from_list(_chat_rows(lines, 2, 10))}).save_to_disk(str(tmp_path / "dd"))
    fmt, why = formats.infer_format(tmp_path / "dd", keys)
    assert fmt == "chat" and "datasets" in why
    ex = formats.read_examples(tmp_path / "dd", "valid", "chat")
    assert ex.records == [r["messages"] for r in _chat_rows(lines, 2, 10)]
    assert formats.has_split(tmp_path / "dd", "valid", "chat") and not formats.has_split(tmp_path / "dd", "dev", "chat")
    renamed = formats.Keys(prompt="q", completion="a")
    rows = [{"q": r["prompt"], "a": r["completion"]} for r in _pc_rows(lines, 2)]
    assert formats.infer_format(_write_jsonl(tmp_path / "e.jsonl", rows), renamed)[0] == "prompt_completion"


def test_text_is_kept_exactly(lines, tmp_path):
    rows = [{"prompt": "  two spaces\tand a tab\n\nand a blank line ", "completion": CODE},
            {"prompt": "ünïcødé → 日本語 🙂", "completion": "\n  leading newline and spaces  "}]
    ex = formats.read_examples(_write_jsonl(tmp_path / "x.jsonl", rows), "train", "prompt_completion")
    assert ex.records == [(r["prompt"], r["completion"]) for r in rows]
    assert ex.where == [f"{tmp_path / 'x.jsonl'}:1", f"{tmp_path / 'x.jsonl'}:2"]


def test_held_out_validation_is_fixed_and_disjoint(lines, tmp_path):
    ex = formats.read_examples(_write_jsonl(tmp_path / "x.jsonl", _pc_rows(lines, 100)), "train", "prompt_completion")
    train, valid = formats.hold_out(ex, 0.1, seed=3)
    again = formats.hold_out(ex, 0.1, seed=3)
    assert len(valid) == 10 and len(train) == 90 and valid.records == again[1].records
    assert not set(train.records) & set(valid.records) and set(train.records) | set(valid.records) == set(ex.records)
    assert formats.hold_out(ex, 0.1, seed=4)[1].records != valid.records


@pytest.mark.parametrize(("fmt", "body", "message"), [
    ("prompt_completion", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"\n',
     r"x.jsonl:2: invalid JSON"),
    ("prompt_completion", '{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n',
     r"x.jsonl:3: missing key 'completion' \(keys: 'prompt'\)"),
    ("prompt_completion", '{"prompt": "a", "completion": "  "}\n', r"x.jsonl:1: empty completion"),
    ("chat", '{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n',
     r"x.jsonl:1: message 2 has unknown role 'bot'"),
    ("chat", '{"messages": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]}\n',
     r"x.jsonl:1: the conversation has no assistant turn"),
    ("chat", '["not", "an", "object"]\n', r"x.jsonl:1: a JSON list, not an object"),
    ("text", '{"text": 3}\n', r"x.jsonl:1: 'text' is a int, not a string"),
])
def test_bad_data_names_file_line_and_problem(tmp_path, fmt, body, message):
    (tmp_path / "x.jsonl").write_text(body, encoding="utf-8")
    with pytest.raises(CorpusError, match=message):
        formats.read_examples(tmp_path / "x.jsonl", "train", fmt)


def test_bad_data_in_a_run_is_one_line_and_writes_nothing(lines, teacher, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text(json.dumps(_pc_rows(lines, 1)[0]) + "\n{oops\n", encoding="utf-8")
    out = tmp_path / "run"
    assert main(["train", f"data.corpus={tmp_path / 'bad.jsonl'}", f"model.teacher={teacher}",
                 "model.preset=llama-tiny", f"train.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad.jsonl'}:2: invalid JSON" in err and "Traceback" not in err
    assert not out.exists()


def test_chat_data_needs_a_chat_template(lines, shared_data, tmp_path, capsys, small_tokenizer):
    small_tokenizer.save(tmp_path / "tok")  # ktransfer's joint BPE: no chat template
    data = _write_jsonl(tmp_path / "chat.jsonl", _chat_rows(lines, 20))
    out = tmp_path / "run"
    assert main(["train", f"data.corpus={data}", f"data.tokenizer={tmp_path / 'tok'}", "model.preset=llama-tiny",
                 "objective.kind=nll", f"train.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "chat data needs a tokenizer with a chat template" in err and "Traceback" not in err
    assert not out.exists()


def test_an_encoder_decoder_refuses_chat_data(lines, tmp_path, capsys, small_tokenizer):
    small_tokenizer.save(tmp_path / "tok")
    data = _write_jsonl(tmp_path / "t.jsonl", [{"text": s} for s in lines["en"][:20]])
    out = tmp_path / "run"
    assert main(["train", f"data.corpus={data}", f"data.tokenizer={tmp_path / 'tok'}", "model.preset=tiny",
                 "objective.kind=nll", f"train.out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "data.format: encoder-decoder models take parallel or prompt_completion data, not 'text'" in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------
# Which tokens the loss covers
# --------------------------------------------------------------------------------------------------------------
def _scored(batch, row: int) -> list[int]:
    labels = batch["labels"][row]
    return labels[labels != IGNORE_INDEX].tolist()


def test_chat_labels_cover_exactly_the_assistant_turns(lines, teacher):
    from ktransfer.models.causal import CausalFamily, token_of

    tok = load_tokenizer(teacher)
    messages = _chat_rows(lines, 2)[1]["messages"]  # a two-turn conversation
    ex = formats.Examples("chat", [messages], ["hand-made"])
    pairs = formats.to_pairs(ex, tok)
    assert len(pairs) == 1  # one example per conversation
    family = CausalFamily()
    prompts, responses = family.encode(pairs, tok, None, model=_with_instruction(teacher, ""), fmt="chat")
    batch = family.collate(prompts, responses, None, tok)
    full = tok.hf.apply_chat_template(messages, tokenize=False)  # the template's own rendering, independently
    full_ids = tok.hf(full, add_special_tokens=False)["input_ids"]
    # what is scored: each assistant's content and its end-of-turn token, nothing of the user's turns
    scored = _scored(batch, 0)
    assert tok.hf.decode(scored) == messages[1]["content"] + "<|end|>" + messages[3]["content"] + "<|end|>"
    # the context is the conversation before the first turn as the template writes it, with the generation prompt
    assert tok.hf.decode(prompts[0]) == tok.hf.apply_chat_template(messages[:1], tokenize=False,
                                                                   add_generation_prompt=True)
    # the sequence is the whole conversation: the model sees what it sees on the full rendering, nothing added
    assert prompts[0] + [token_of(t) for t in responses[0]] == full_ids
    assert "<|user|>" in tok.hf.decode(prompts[0]) and len(tok.encode("<|assistant|>")) == 1


def test_prompt_completion_labels_and_whitespace(lines, teacher):
    from ktransfer.models.causal import CausalFamily

    tok = load_tokenizer(teacher)
    family = CausalFamily()
    model = _with_instruction(teacher, "")
    pairs = [("Write code:\n", CODE), ("", "text has an empty prompt")]
    prompts, responses = family.encode(pairs, tok, None, model=model, fmt="prompt_completion")
    batch = family.collate(prompts, responses, None, tok)
    assert tok.decode(_scored(batch, 0)[:-1]) == CODE and _scored(batch, 0)[-1] == tok.eos_id  # exact, code kept
    assert prompts[0] == tok.hf("Write code:\n")["input_ids"]  # tok(prompt)'s ids: nothing injected
    # an empty prompt: the text's first token is read, not scored (it has nothing to be predicted from)
    first, *rest = tok.hf("text has an empty prompt")["input_ids"]
    assert prompts[1] == [first] and _scored(batch, 1) == [*rest, tok.eos_id]
    # an instruction only when asked for, and over-long completions cut with truncate
    model = _with_instruction(teacher, "Answer:")
    prompts, _ = family.encode(pairs[:1], tok, None, model=model, fmt="prompt_completion")
    assert prompts[0] == [*tok.encode("Answer:"), *tok.encode("Write code:\n")]
    logs = []
    limit = len(prompts[0]) + 3
    assert family.encode(pairs[:1], tok, limit, model=model, fmt="prompt_completion", log=logs.append) == ([], [])
    p, r = family.encode(pairs[:1], tok, limit, model=model, fmt="prompt_completion", truncate=True, log=logs.append)
    assert len(p[0]) + len(r[0]) == limit and "dropped 0 with an empty completion and 1 longer" in logs[0]
    assert "cut 1 to fit" in logs[1]


def _with_instruction(folder: Path, text: str):
    from ktransfer.models.family import load_model

    model, _ = load_model(folder)
    model.config.ktransfer_instruction = text
    return model


# --------------------------------------------------------------------------------------------------------------
# End to end: a causal learner distilled on each format
# --------------------------------------------------------------------------------------------------------------
def _data(kind: str, lines, folder: Path) -> Path:
    from datasets import Dataset, DatasetDict

    folder.mkdir(parents=True, exist_ok=True)
    if kind == "prompt_completion":  # one file: validation held out
        return _write_jsonl(folder / "pc.jsonl", _pc_rows(lines, 60))
    if kind == "chat":  # a folder of SPLIT.jsonl
        _write_jsonl(folder / "train.jsonl", _chat_rows(lines, 50))
        _write_jsonl(folder / "valid.jsonl", _chat_rows(lines, 6, 100))
        return folder
    if kind == "text":
        (folder / "lm.txt").write_text("\n".join(lines["en"][:60]) + "\n", encoding="utf-8")
        return folder / "lm.txt"
    DatasetDict({"train": Dataset.from_list(_pc_rows(lines, 50)),
                 "valid": Dataset.from_list(_pc_rows(lines, 6, 100))}).save_to_disk(str(folder / "ds"))
    return folder / "ds"


def _args(data: Path, teacher: Path, out: Path, *extra) -> list[str]:
    return ["train", f"data.corpus={data}", f"model.teacher={teacher}", "model.preset=llama-tiny",
            "objective.kind=ka", "objective.top_k=8", "data.max_tokens=800", "data.max_length=120",
            "eval.max_length=12", "eval.valid_examples=2", "optim.lr=3e-3", "train.max_steps=4", "train.epochs=1",
            "train.num_threads=1", f"train.out_dir={out}", *extra]


@pytest.mark.parametrize("kind", ["prompt_completion", "chat", "text", "datasets"])
def test_distil_a_causal_learner_on_each_format(kind, lines, teacher, tmp_path):
    data = _data(kind, lines, tmp_path / "data")
    run = tmp_path / "run"
    assert main(_args(data, teacher, run)) == 0
    log = (run / "train.log").read_text(encoding="utf-8")
    fmt = "prompt_completion" if kind == "datasets" else kind
    assert f"data: {fmt} (" in log
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    teacher_row = next(r for r in rows if r["kind"] == "teacher_valid")
    valid = [r for r in rows if r["kind"] == "valid"][-1]
    assert valid["bleu"] is None and valid["ppl"] == pytest.approx(torch.tensor(valid["nll"]).exp().item(), rel=1e-6)
    assert teacher_row["ppl"] > 1 and "example 1: prompt" in log
    if kind == "prompt_completion":
        assert "validation: 3 examples held out" in log  # 5% of 60
    # evaluate the learner on the data it was validated on: NLL, perplexity, generations
    assert main(["evaluate", str(run), "--beam", "1", "--max-length", "8", "--out", str(tmp_path / "eval")]) == 0
    split = "valid"
    scores = json.loads((tmp_path / "eval" / f"scores.{split}.json").read_text())
    generations = (tmp_path / "eval" / f"generations.{split}.jsonl").read_text().splitlines()
    assert scores["format"] == fmt and scores["ppl"] > 1 and scores["tokens"] > 0
    assert len(generations) == (0 if kind == "text" else scores["examples"])


def test_evaluate_nll_is_the_per_token_mean_of_the_completions(lines, teacher, tmp_path):
    """``evaluate_examples``'s NLL against a float64 sum of -log p over the completion tokens, computed here."""
    from ktransfer.evaluation.evaluate import evaluate_examples
    from ktransfer.models.family import load_model
    from ktransfer.models.generation import DecodeSettings

    data = _write_jsonl(tmp_path / "valid.jsonl", _pc_rows(lines, 5))
    examples = formats.read_examples(data, "valid", "prompt_completion")
    result = evaluate_examples(teacher, examples, data, "valid", DecodeSettings(1, 1.0, 6), out_dir=tmp_path / "ev")
    model, tok = load_model(teacher)
    total, count = 0.0, 0
    for row in _pc_rows(lines, 5):
        p, whole = tok.hf(row["prompt"])["input_ids"], tok.hf(row["prompt"] + row["completion"])["input_ids"]
        assert whole[:len(p)] == p  # the prompt's ids start those of the whole text: the completion is the rest
        prompt, completion = p, [*whole[len(p):], tok.eos_id]  # tok(prompt)'s ids, nothing added
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        for j, y in enumerate(completion):
            total -= float(logp[len(prompt) - 1 + j, y])
            count += 1
    assert result["tokens"] == count and result["nll"] == pytest.approx(total / count, rel=1e-5)


def test_on_policy_prefixes_on_chat_data(lines, teacher, tmp_path, monkeypatch):
    """The learner samples each assistant turn after its reference conversation (the prompt ends with the
    template's generation prompt), and the divergence is taken on the sample."""
    from ktransfer.models.causal import CausalFamily, prompts_of

    seen = []
    real = CausalFamily.on_policy_batch

    def spy(self, model, tokenizer, batch, settings):
        sampled = real(self, model, tokenizer, batch, settings)
        seen.append((prompts_of(batch), prompts_of(sampled), tokenizer))
        return sampled

    monkeypatch.setattr(CausalFamily, "on_policy_batch", spy)
    data = _data("chat", lines, tmp_path / "data")
    run = tmp_path / "run"
    assert main(_args(data, teacher, run, "objective.prefix=learner", "objective.sample_max_length=8")) == 0
    assert len(seen) == 4  # every training batch
    for before, after, tok in seen:
        assert before == after  # same prompts, the responses are the learner's
        assert all(tok.hf.decode(p).endswith("<|assistant|>") for p in before)


def test_distill_data_gives_the_teachers_completions(lines, teacher, tmp_path):
    from ktransfer.models.causal import CausalFamily
    from ktransfer.models.family import load_model
    from ktransfer.models.generation import DecodeSettings

    data = _data("chat", lines, tmp_path / "data")
    out = tmp_path / "seqkd"
    assert main(["distill-data", str(teacher), "--corpus", str(data), "--out", str(out), "--beam", "1",
                 "--max-length", "6", "--limit", "4", "--no-progress"]) == 0
    got = [json.loads(x) for x in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    src = _chat_rows(lines, 4)
    assert [[m["content"] for m in r["messages"] if m["role"] != "assistant"] for r in got] == \
        [[m["content"] for m in r["messages"] if m["role"] != "assistant"] for r in src]
    # each assistant turn is what the teacher generates after the conversation before it
    model, tok = load_model(teacher)
    model.config.ktransfer_instruction = ""
    pairs = formats.turn_pairs(formats.Examples("chat", [r["messages"] for r in src]), tok)
    prompts, _ = CausalFamily().encode(pairs, tok, None, model=model, fmt="chat")
    want = CausalFamily().complete(model, tok, prompts, DecodeSettings(1, 1.0, 6))
    assert [m["content"] for r in got for m in r["messages"] if m["role"] == "assistant"] == want
    assert (out / "valid.jsonl").read_text() == (data / "valid.jsonl").read_text()  # other splits copied
    assert main(["train", f"data.corpus={out}", f"model.teacher={teacher}", "model.preset=llama-tiny",
                 "objective.kind=kd", "train.max_steps=2", "train.epochs=1", "data.max_length=120",
                 "eval.max_length=6", f"train.out_dir={tmp_path / 'run'}"]) == 0


def test_data_check_describes_jsonl_data_and_names_the_bad_line(lines, tmp_path, capsys):
    folder = tmp_path / "chat"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", _chat_rows(lines, 10))
    _write_jsonl(folder / "valid.jsonl", _chat_rows(lines, 4, 100))
    assert main(["data", "check", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"{folder}: chat (" in out and "train: 10 examples, 15 assistant turns" in out
    assert "valid: 4 examples, 6 assistant turns" in out
    (folder / "valid.jsonl").write_text('{"messages": []}\n', encoding="utf-8")
    assert main(["data", "check", str(folder)]) == 1
    assert f"{folder / 'valid.jsonl'}:1: 'messages' must be a non-empty list" in capsys.readouterr().err


def test_distill_data_on_jsonl_resumes_the_chunks_it_lacks(lines, teacher, tmp_path, monkeypatch):
    from ktransfer.evaluation.seqkd import distill_examples
    from ktransfer.models.causal import CausalFamily

    data = _data("chat", lines, tmp_path / "data")
    kw = dict(data=data, beam=1, max_length=5, limit=4, chunk_lines=2, log=lambda _: None)
    straight = distill_examples(teacher, tmp_path / "straight", **kw)
    calls, real = [], CausalFamily.complete

    def dying(self, *args, **kwargs):  # the second chunk kills the run
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CausalFamily, "complete", dying)
    with pytest.raises(KeyboardInterrupt):
        distill_examples(teacher, tmp_path / "resumed", **kw)
    assert not (tmp_path / "resumed").exists() and (tmp_path / ".resumed.partial").is_dir()
    calls.clear()
    monkeypatch.setattr(CausalFamily, "complete", lambda self, *a, **k: (calls.append(1), real(self, *a, **k))[1])
    resumed = distill_examples(teacher, tmp_path / "resumed", **kw)
    turns = straight["completions"]  # 6 assistant turns in 4 conversations: chunks of 2 -> 3 chunks
    assert turns == 6 and len(calls) == 2  # only the two chunks that were missing
    assert (tmp_path / "resumed/train.jsonl").read_text() == (tmp_path / "straight/train.jsonl").read_text()
    assert resumed["job"] == straight["job"]
    assert distill_examples(teacher, tmp_path / "resumed", **kw)["job"] == straight["job"]  # finished: nothing to do
    assert len(calls) == 2
