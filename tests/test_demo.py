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


def test_infused_models_beat_their_bases_on_new_facts(demo):
    report = json.loads((demo / "report" / "report.json").read_text())
    for name in ("base", "chat"):
        assert accuracy(report, f"{name}+infused", "new") > accuracy(report, name, "new"), name


def test_chat_models_keep_their_manners(demo):
    report = json.loads((demo / "report" / "report.json").read_text())
    assert accuracy(report, "chat+infused", "general") >= accuracy(report, "chat", "general") > 0


def test_a_rerun_reuses_every_finished_stage(demo, capsys):
    main(["demo", "--quick", "--output", str(demo)])
    printed = capsys.readouterr().out
    assert printed.count("reusing it") >= 5  # base, chat, pages, and both infusions
    assert "step " not in printed  # nothing trained again
