"""`infuse demo --quick`: the four-model experiment end to end, and what its report must show."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from infuse.cli import main
from infuse.demo import DemoSettings, check_world_unchanged, generated_world, infuse_config, pretrain_config, sft_config
from infuse.errors import InfuseError

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


def test_the_infused_chat_model_beats_the_chat_model_on_new_facts(demo):
    report = json.loads((demo / "report" / "report.json").read_text())
    assert accuracy(report, "chat+infused", "new") > accuracy(report, "chat", "new")


def test_replay_leaves_out_what_the_pages_change(demo):
    """The corpus documents about the upgraded families restate their stale accelerators; the
    infusion runs leave them out of replay (replay_skip_subjects) and say which words they left out."""
    world = json.loads((demo / "world" / "world.json").read_text())
    for name in ("base", "chat"):
        replay = json.loads((demo / f"{name}-infused" / "infuse_run.json").read_text())["data"]["replay"]
        assert replay["skipped_subjects"] == sorted(world["updated"])
        assert replay["documents_skipped_for_subjects"] >= len(world["updated"]) * world["docs_per_family"]


def test_the_base_model_rehearses_the_corpus_as_it_was_pretrained(demo):
    """The base model replays the corpus with as many shuffled copies as it was pretrained on, and
    its copies move opening phrases; the chat model's replay holds its chat data, without copies."""
    run = {name: json.loads((demo / name / "infuse_run.json").read_text())
           for name in ("base", "base-infused", "chat-infused")}
    pretrained_with = run["base"]["config"]["sentence_shuffles"]
    assert pretrained_with > 0
    assert run["base-infused"]["config"]["replay_sentence_shuffles"] == pretrained_with
    assert run["base-infused"]["data"]["replay"]["shuffled_copies"] > 0
    assert run["base-infused"]["config"]["move_openers"] and not run["chat-infused"]["config"]["move_openers"]
    assert run["chat-infused"]["data"]["replay"]["shuffled_copies"] == 0


def test_only_the_chat_model_reads_the_pages_as_chat_turns(demo):
    runs = {name: json.loads((demo / f"{name}-infused" / "infuse_run.json").read_text()) for name in ("base", "chat")}
    turns = {name: run["data"]["train"]["sentence_turns"] for name, run in runs.items()}
    assert turns["base"] == 0 and turns["chat"] > 0


def test_the_infused_chat_model_keeps_its_manners(demo):
    report = json.loads((demo / "report" / "report.json").read_text())
    assert accuracy(report, "chat+infused", "general") >= accuracy(report, "chat", "general")


def test_a_rerun_reuses_every_finished_stage(demo, capsys):
    main(["demo", "--quick", "--output", str(demo)])
    printed = capsys.readouterr().out
    assert printed.count("reusing it") >= 5  # base, chat, pages, and both infusions
    assert "step " not in printed  # nothing trained again


def test_a_generated_world_is_reused_only_with_the_options_it_was_made_with(tmp_path):
    world = generated_world(tmp_path / "world", seed=0, families=8, vocabulary="birds")
    probes = (world / "probes.jsonl").read_text()
    assert generated_world(tmp_path / "world", seed=0, families=8, vocabulary="birds") == world
    assert (world / "probes.jsonl").read_text() == probes
    with pytest.raises(InfuseError, match="seed 0, 8 families and vocabulary birds, not the one asked for"):
        generated_world(tmp_path / "world", seed=0, families=9, vocabulary="birds")


def test_a_world_folder_edited_after_a_run_is_not_run_on_with_its_old_stages(tmp_path):
    world = generated_world(tmp_path / "world", seed=0, families=8, vocabulary="birds")
    check_world_unchanged(world, tmp_path / "out")
    check_world_unchanged(world, tmp_path / "out")  # the same files: the stages are reused
    page = sorted((world / "news").glob("*.html"))[0]
    page.write_text(page.read_text().replace("</p>", " An added sentence.</p>", 1))
    with pytest.raises(InfuseError, match=f"other contents of {world} \\(news/{page.name} changed"):
        check_world_unchanged(world, tmp_path / "out")
    check_world_unchanged(world, tmp_path / "another-out")


def test_a_finished_stage_is_reused_only_with_the_settings_it_was_trained_with(demo, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--quick", "--output", str(demo), "--train-seed", "7"])
    error = " ".join(capsys.readouterr().err.split())
    assert stopped.value.code == 2
    assert f"{demo / 'base'} was trained with other settings (seed: 42 -> 7)" in error


def test_the_training_seed_reaches_every_training_stage(tmp_path):
    settings = replace(DemoSettings(), train_seed=7)
    configs = [pretrain_config(tmp_path, tmp_path, settings), sft_config(tmp_path, tmp_path, settings),
               *(infuse_config(name, "model", tmp_path / name, tmp_path / "docs.jsonl", tmp_path, settings)
                 for name in ("base", "chat"))]
    assert [config.training["seed"] for config in configs] == [7, 7, 7, 7]
