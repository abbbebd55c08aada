"""One beam default and one device default across the commands (issue 26, point 8): ``evaluate``, ``translate`` and
``distill-data`` beam-search with ``eval.beam``'s default, and every command runs on ``train.device``'s default
(auto: cuda when available)."""

from __future__ import annotations

import pytest

from ktransfer.cli import build_parser
from ktransfer.training.config import load_config

ARGS = {"evaluate": ["runs/x"], "translate": ["runs/x"], "distill-data": ["runs/x", "--out", "o"],
        "generate": ["runs/x"]}


@pytest.mark.parametrize("command", sorted(ARGS))
def test_beam_and_device_defaults_agree(command, capsys):
    cfg = load_config(None, [])
    args = build_parser(command).parse_args([command, *ARGS[command]])
    assert args.device == cfg.train.device == "auto"
    if command != "generate":  # generate is greedy by default, as transformers' generate()
        assert args.beam == cfg.eval.beam == 6
    with pytest.raises(SystemExit):
        build_parser(command).parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: auto)" in text and ("(default: 6)" in text or command == "generate")
