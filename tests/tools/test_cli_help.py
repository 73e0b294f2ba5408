"""What `--help` teaches: every subcommand shows examples; `bitpass passes NAME` explains options in plain words;
`compile --json` prints a summary scripts can read."""

from __future__ import annotations

import json

import pytest

from bitpass.tools.cli import build_parser, main

COMMANDS = ["compile", "passes", "pipelines", "inspect", "verify", "run", "example"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"bitpass {command}" in out


def test_the_subcommand_list_is_the_tested_one():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)


def test_passes_name_explains_options_in_plain_words(capsys):
    assert main(["passes", "quantize"]) == 0
    out = capsys.readouterr().out
    assert "activation_type" in out and "one of auto, int8, uint8" in out and "true/false" in out
    assert "Literal" not in out and "typing" not in out


def test_passes_with_an_unknown_name_suggests_one(capsys):
    assert main(["passes", "quantise"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'quantize'" in err[0]


def test_compile_json_prints_the_summary_as_json(digits_files, tmp_path, capsys):
    assert main(["compile", str(digits_files / "model.onnx"), "-o", str(tmp_path / "out"), "--pipeline", "optimize",
                 "--eval", str(digits_files / "eval.npz"), "--no-latency", "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["artifact"] == str(tmp_path / "out")
    assert summary["metrics"]["quality"]["fidelity"]["top1_agreement"] == 1.0
