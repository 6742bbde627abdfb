"""`infuse demo --quick`: the four-model experiment end to end, and what its report must show."""

from __future__ import annotations

import json

import pytest

from infuse.cli import main

MODELS = ("base", "base+infused", "chat", "chat+infused")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    main(["demo", "--quick", "--output", str(out)])
    return out


def accuracy(report: dict, model: str, group: str) -> float:
    return report["models"][model]["groups"][group]["accuracy"]


def test_the_report_holds_all_four_models(demo):
    report = json.loads((demo / "report" / "report.json").read_text())
    assert set(report["models"]) == set(MODELS)
    html = (demo / "report" / "report.html").read_text()
    assert all(name in html for name in MODELS)


def test_the_infused_base_model_beats_the_base_on_new_facts(demo):
    report = json.loads((demo / "report" / "report.json").read_text())
    assert accuracy(report, "base+infused", "new") > accuracy(report, "base", "new")
    assert accuracy(report, "base+infused", "old") >= 0.8 * accuracy(report, "base", "old")


def test_the_chat_model_has_its_manners(demo):
    report = json.loads((demo / "report" / "report.json").read_text())
    assert accuracy(report, "chat", "general") > 0
    assert report["models"]["chat"]["adherence"]["ended_at_turn_end"] > 0.5


@pytest.mark.xfail(
    reason="QLoRA continued pretraining of the 1M-parameter demo chat model does not yet teach it the new "
    "facts: it answers with the names of families from its chat data (issue 7 is open; see the README)",
    strict=False,
)
def test_the_infused_chat_model_beats_the_chat_model_on_new_facts(demo):
    report = json.loads((demo / "report" / "report.json").read_text())
    assert accuracy(report, "chat+infused", "new") > accuracy(report, "chat", "new")


def test_the_infused_chat_model_keeps_its_manners(demo):
    report = json.loads((demo / "report" / "report.json").read_text())
    assert accuracy(report, "chat+infused", "general") >= accuracy(report, "chat", "general")


def test_a_rerun_reuses_every_finished_stage(demo, capsys):
    main(["demo", "--quick", "--output", str(demo)])
    printed = capsys.readouterr().out
    assert printed.count("reusing it") >= 5  # base, chat, pages, and both infusions
    assert "step " not in printed  # nothing trained again
