"""The synthetic world: deterministic by seed, and its probes test what its texts state."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from infuse.world import generate_world, write_world

WORLDS = [dict(seed=0), dict(seed=7, families=12, new_families=4, updates=3, vocabulary="stones")]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def visible_text(html: str) -> str:
    html = re.sub(r"<script.*?</script>", " ", html, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"seed{w['seed']}")
def world(request, tmp_path_factory):
    folder = write_world(generate_world(**request.param), tmp_path_factory.mktemp("world"))
    pages = [visible_text(p.read_text()) for p in sorted((folder / "news").glob("*.html"))]
    return {
        "world": generate_world(**request.param),
        "pretrain": " ".join(row["text"] for row in read_jsonl(folder / "pretrain.jsonl")),
        "sft": (folder / "sft.jsonl").read_text(),
        "news": " ".join(pages),
        "probes": read_jsonl(folder / "probes.jsonl"),
        "folder": folder,
    }


def test_same_seed_same_world_other_seed_other_world(tmp_path):
    a, b, c = (
        write_world(generate_world(seed), tmp_path / name) for seed, name in ((3, "a"), (3, "b"), (4, "c"))
    )
    for name in ("pretrain.jsonl", "sft.jsonl", "probes.jsonl"):
        assert (a / name).read_text() == (b / name).read_text()
        assert (a / name).read_text() != (c / name).read_text()


def test_new_facts_appear_only_in_the_announcements(world):
    for family in world["world"].new:
        mention = f"{family.name} instance"
        assert mention in world["news"]
        assert mention not in world["pretrain"] and mention not in world["sft"]
        assert family.accelerator not in world["pretrain"] and family.accelerator not in world["sft"]


def test_updated_facts_differ_from_the_old_ones(world):
    w = world["world"]
    assert len(w.updated) >= 2
    for name, change in w.updated.items():
        old = next(f for f in w.old if f.name == name)
        assert change["accelerator"] != old.accelerator
        assert old.accelerator in world["pretrain"] and change["accelerator"] not in world["pretrain"]
        assert change["accelerator"] in world["news"]


def test_every_probe_answer_is_stated_in_its_text(world):
    source = {
        "new": world["news"],
        "updated": world["news"],
        "old": world["pretrain"],
        "general": world["sft"],
    }
    groups = {p["group"] for p in world["probes"]}
    assert groups == {"new", "updated", "old", "general"}
    for probe in world["probes"]:
        assert probe["mode"] in ("chat", "completion") and probe["prompt"]
        assert any(answer in source[probe["group"]] for answer in probe["answers"]), probe
        if probe["group"] == "updated":
            assert probe["wrong"] and all(stale in world["pretrain"] for stale in probe["wrong"])


def test_chat_probes_are_phrased_unlike_the_pages(world):
    for probe in world["probes"]:
        if probe["mode"] == "chat" and probe["group"] in ("new", "updated"):
            assert probe["prompt"] not in world["news"]


def test_pages_carry_the_boilerplate_that_ingestion_must_remove(world):
    html = next((world["folder"] / "news").glob("*.html")).read_text()
    for part in ("<nav>", "cookie", "<script>", "<footer>"):
        assert part in html


def test_a_world_too_big_for_its_name_pools_is_refused():
    with pytest.raises(ValueError, match="too big"):
        generate_world(families=200)
