"""Bad input reaches the user as one clear paragraph and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infuse.cli import main


@pytest.fixture
def recipe(tmp_path, tiny_llama_config_path, tokenizer_dir):
    """A valid pretraining recipe on one good document; each test breaks one thing."""
    (tmp_path / "good.jsonl").write_text('{"text": "A short but valid document."}\n')
    config = {
        "model_config": str(tiny_llama_config_path),
        "tokenizer_name_or_path": str(tokenizer_dir),
        "dataset": [str(tmp_path / "good.jsonl")],
        "finetuning_type": "full",
        "block_size": 64,
        "output_dir": str(tmp_path / "out"),
        "max_steps": 1,
        "report_to": "none",
        "cache_dir": str(tmp_path / "cache"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fails_with(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("error:") and "\n\n" not in err.strip(), err  # one paragraph
    return " ".join(err.split())  # undo the console's line wrapping


def test_empty_corpus(recipe, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    err = fails_with(["train", str(recipe), "--dataset", f"[{tmp_path / 'empty.txt'}]"], capsys)
    assert "empty corpus" in err and "empty.txt" in err


def test_jsonl_line_that_is_not_json_names_file_and_line(recipe, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "fine too"}\nnot json at all\n')
    err = fails_with(["train", str(recipe), "--dataset", f"[{tmp_path / 'bad.jsonl'}]"], capsys)
    assert "bad.jsonl:3" in err and "not valid JSON" in err


def test_missing_text_field_lists_the_fields_found(recipe, tmp_path, capsys):
    (tmp_path / "body.jsonl").write_text('{"body": "the text is here"}\n')
    err = fails_with(["train", str(recipe), "--dataset", f"[{tmp_path / 'body.jsonl'}]"], capsys)
    assert "body.jsonl:1" in err and "'text'" in err and "body" in err and "text_field" in err


def test_unknown_config_key_suggests_the_close_match(recipe, capsys):
    err = fails_with(["train", str(recipe), "--learnin_rate", "1e-3"], capsys)
    assert "unknown key 'learnin_rate'" in err and "learning_rate" in err


def test_model_path_that_does_not_exist(recipe, tmp_path, capsys):
    missing = tmp_path / ("no-such-model-" + "x" * 80)  # longer than a line: the path must not be folded
    err = fails_with(
        ["train", str(recipe), "--model_config", "null", "--model_name_or_path", str(missing)], capsys
    )
    assert str(missing) in err and "does not exist" in err
    assert not (tmp_path / "cache").exists()  # checked before any data was tokenized


def test_block_size_longer_than_the_context(recipe, capsys):
    err = fails_with(["train", str(recipe), "--block_size", "4096"], capsys)
    assert "block_size 4096" in err and "max_position_embeddings is 512" in err


def test_each_launched_process_names_itself_in_its_error(recipe, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets them in its second process
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        main(["train", str(recipe), "--learnin_rate", "1e-3"])
    err = capsys.readouterr().err
    assert err.startswith("error (process 1 of 2): ") and "unknown key 'learnin_rate'" in err


def test_debug_shows_the_traceback(recipe, capsys):
    with pytest.raises(Exception, match="unknown key"):
        main(["train", str(recipe), "--learnin_rate", "1e-3", "--debug"])


def test_the_installed_command_exits_2_without_traceback(recipe):
    done = subprocess.run(
        [sys.executable, "-m", "infuse.cli", "train", str(recipe), "--block_size", "4096"],
        capture_output=True,
        text=True,
        cwd=Path(recipe).parent,
    )
    assert done.returncode == 2
    assert "block_size 4096" in done.stderr and "Traceback" not in done.stderr


def commands(parser) -> dict[str, object]:
    """Every command of ``parser`` by its full name ('tokenizer train'), subcommands included."""
    import argparse

    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = commands(sub)
                found.update({f"{name} {inner}": p for inner, p in nested.items()} if nested else {name: sub})
    return found


def test_every_command_and_option_explains_itself():
    from infuse.cli import build_parser

    found = commands(build_parser())
    assert {"tokenizer train", "ingest", "train", "preflight", "merge", "serve", "chat", "eval",
            "probes make", "demo"} <= set(found)
    for name, parser in found.items():
        assert parser.description, f"infuse {name} has no description"
        bare = [action.dest for action in parser._actions if not action.help and action.dest != "help"]
        assert not bare, f"infuse {name}: no help for {bare}"


def test_train_help_lists_every_own_key_with_its_default(capsys):
    import dataclasses

    from infuse.cli import main
    from infuse.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # undo the wrapping
    for spec in dataclasses.fields(TrainConfig):
        if spec.name != "training":
            assert f" {spec.name} {' '.join(spec.metadata['help'].split())} (default: " in text, spec.name
    assert "val_size Hold out this share" in text and "(default: 0.0)" in text and "(default: null)" in text
    assert "TrainingArguments defaults infuse changes" in text and "lr_scheduler_type cosine, warmup_steps 0.03" in text
