"""Probe files, the matching rule, and cloze probes made from documents."""

from __future__ import annotations

import json

import pytest

from infuse.cli import main
from infuse.errors import InfuseError
from infuse.evaluate import load_probes, make_probes
from infuse.evaluate.make_probes import cloze
from infuse.evaluate.probes import contains_any


def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_probes_reads_every_field_and_defaults(tmp_path):
    path = write(tmp_path / "p.jsonl", [
        json.dumps({"id": "a", "group": "new", "mode": "chat", "prompt": "Q?", "answers": ["x"],
                    "wrong": ["y"]}),
        json.dumps({"prompt": "The sky is", "answers": "blue"}),
    ])
    first, second = load_probes(path)
    assert (first.id, first.group, first.mode) == ("a", "new", "chat")
    assert (first.answers, first.wrong) == (("x",), ("y",))
    assert (second.id, second.group, second.mode, second.answers) == ("1", "default", "completion", ("blue",))
    assert first.where == f"{path}:1"


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "prompt": "ok"', "not valid JSON"),
    ('{"id": "a", "answers": ["x"]}', "needs a non-empty string 'prompt' (fields found: answers, id)"),
    ('{"id": "a", "prompt": "Q", "mode": "instruct"}', "unknown mode 'instruct'"),
    ('{"id": "a", "prompt": "Q", "answers": [3]}', "'answers' should be a list of non-empty strings"),
    ('["a list"]', "expected a JSON object"),
])
def test_bad_probe_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"id": "g", "prompt": "fine"})
    path = write(tmp_path / "bad.jsonl", [good, "", line])
    with pytest.raises(InfuseError) as caught:
        load_probes(path)
    assert f"{path}:3" in str(caught.value)
    assert message in str(caught.value)


def test_repeated_ids_and_missing_files_are_errors(tmp_path):
    path = write(tmp_path / "p.jsonl", [json.dumps({"id": "a", "prompt": p}) for p in ("x", "y")])
    with pytest.raises(InfuseError, match=r"p.jsonl:2: probe id 'a' is used again \(first at .*p.jsonl:1\)"):
        load_probes(path)
    with pytest.raises(InfuseError, match="no such file"):
        load_probes(tmp_path / "missing.jsonl")


def test_eval_cli_reports_a_bad_probe_file_with_exit_2(tmp_path, capsys):
    path = write(tmp_path / "bad.jsonl", ['{"id": "a", "prompt": "Q", "mode": "poem"}'])
    with pytest.raises(SystemExit) as caught:
        main(["eval", "--model", f"m={tmp_path}", "--probes", str(path), "--output", str(tmp_path / "out")])
    assert caught.value.code == 2
    assert f"{path}:1" in capsys.readouterr().err.replace("\n", "")


def test_matching_ignores_case_and_whitespace_runs():
    assert contains_any("It runs on  NVIDIA\nH100 GPUs.", ["nvidia h100"])
    assert not contains_any("It runs on NVIDIA A100.", ["nvidia h100", "TPU"])
    assert contains_any("Lake   Amber", ["lake amber"])


@pytest.mark.parametrize("sentence, expected", [
    ("Amazon EC2 P5 instances are equipped with NVIDIA H100 GPUs.",
     ("Amazon EC2 P5 instances are equipped with", "NVIDIA H100 GPUs")),
    ("The cluster was switched on in the spring of 2031.",
     ("The cluster was switched on in the spring of", "2031")),
    ("The founder of Tallow Works is Mira Kent.", ("The founder of Tallow Works is", "Mira Kent")),
    ("The mascot of the lab is a grey heron.", None),           # ends in an ordinary word
    ("Is the capital of Zorvia Quellport?", None),               # a question
    ("Zorvia is Zorvia.", None),                                 # too short, and the answer is in the prompt
    ("The report by the Zorvia office names Zorvia.", None),     # the answer is already in the prompt
])
def test_cloze_cuts_before_a_final_name_or_number(sentence, expected):
    assert cloze(sentence) == expected


def test_make_probes_is_deterministic_round_robin_and_bounded(tmp_path):
    docs = tmp_path / "docs.jsonl"
    rows = [
        {"text": "The Orion cluster runs on chips made by Zephyr. It was built in 2031. Nothing happened.",
         "source": "http://a/1"},
        {"text": "The founder of Tallow Works is Mira Kent. The company has 120 staff.", "source": "http://a/2"},
    ]
    write(docs, [json.dumps(r) for r in rows])
    probes = make_probes([docs], group="news")
    # Round-robin: each document's first sentence, then the second ones; "120 staff" ends in a plain word.
    assert [p["prompt"] for p in probes] == ["The Orion cluster runs on chips made by",
                                             "The founder of Tallow Works is", "It was built in"]
    assert [p["answers"] for p in probes] == [["Zephyr"], ["Mira Kent"], ["2031"]]
    assert {p["group"] for p in probes} == {"news"} and {p["mode"] for p in probes} == {"completion"}
    assert probes[0]["source"] == "http://a/1" and probes[0]["id"] == "news-cloze-0001"
    assert make_probes([docs], group="news") == probes
    assert make_probes([docs], max_probes=2, group="news") == probes[:2]


def test_probes_make_cli_writes_loadable_probes(tmp_path):
    docs = write(tmp_path / "docs.jsonl", [json.dumps({"text": "The capital of Zorvia is Quellport."})])
    out = tmp_path / "probes.jsonl"
    main(["probes", "make", str(docs), "--output", str(out), "--group", "new"])
    (probe,) = load_probes(out)
    assert (probe.prompt, probe.answers, probe.group) == ("The capital of Zorvia is", ("Quellport",), "new")


def test_probes_make_cli_fails_clearly_when_no_sentence_fits(tmp_path, capsys):
    docs = write(tmp_path / "docs.jsonl", [json.dumps({"text": "nothing to see here, really."})])
    with pytest.raises(SystemExit) as caught:
        main(["probes", "make", str(docs), "--output", str(tmp_path / "p.jsonl")])
    assert caught.value.code == 2
    assert "ends in a name or a number" in " ".join(capsys.readouterr().err.split())
