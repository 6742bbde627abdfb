"""The hand-written world folder examples/worlds/harbor-ferries: well-formed, and every probe answer
is stated in the text its model sees (news pages for new and updated facts, the pretraining corpus
for old ones), while new facts appear nowhere the models saw before the news."""

from __future__ import annotations

import json
import re
from itertools import pairwise
from pathlib import Path

import pytest

from infuse.ingest.extract import Payload, extract_html

WORLD = Path(__file__).resolve().parents[1] / "examples" / "worlds" / "harbor-ferries"
NEW_SHIPS = ("Heather Venture", "Willow Rose", "Fulmar Grace")
PROBE_KEYS = {"id", "group", "mode", "prompt", "answers", "wrong"}
GROUPS = {"new", "updated", "old", "general"}
ROLES = {"system", "user", "assistant"}
POWERED = re.compile(r"The (.+) is powered by engines from")


def norm(text: str) -> str:
    """Probe matching as the README defines it: case-insensitive, whitespace-normalised."""
    return " ".join(text.split()).lower()


def read_jsonl(name: str) -> list[dict]:
    rows = []
    for number, line in enumerate((WORLD / name).read_text(encoding="utf-8").splitlines(), 1):
        assert line.strip(), f"{name}:{number} is blank"
        rows.append(json.loads(line))
    return rows


@pytest.fixture(scope="module")
def pretrain() -> list[str]:
    return [row["text"] for row in read_jsonl("pretrain.jsonl")]


@pytest.fixture(scope="module")
def sft() -> list[dict]:
    return read_jsonl("sft.jsonl")


@pytest.fixture(scope="module")
def probes() -> list[dict]:
    return read_jsonl("probes.jsonl")


@pytest.fixture(scope="module")
def news() -> dict[str, str]:
    """Each page's text as ingest extracts it (menus, banners, scripts and footers removed)."""
    pages = {}
    for page in sorted((WORLD / "news").glob("*.html")):
        extracted = extract_html(Payload(page.read_bytes(), str(page)))
        assert extracted, f"no main text extracted from {page.name}"
        pages[page.name] = norm(extracted[0].text)
    return pages


def sft_texts(sft: list[dict]) -> list[str]:
    return [m["content"] for row in sft for m in row["messages"]]


def test_pretrain_lines_are_nonempty_texts(pretrain):
    assert 150 <= len(pretrain) <= 250
    assert all(isinstance(text, str) and len(text.split()) > 20 for text in pretrain)
    assert 10_000 <= sum(len(text.split()) for text in pretrain) <= 20_000


def test_sft_lines_are_conversations_ending_with_the_assistant(sft):
    for row in sft:
        messages = row["messages"]
        assert {m["role"] for m in messages} <= ROLES
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in messages)
        turns = [m["role"] for m in messages if m["role"] != "system"]
        assert turns[0] == "user" and turns[-1] == "assistant"
        assert all(a != b for a, b in pairwise(turns)), f"roles do not alternate: {turns}"


def test_probes_have_the_design_fields_groups_and_modes(probes):
    assert all(set(p) == PROBE_KEYS for p in probes)
    assert len({p["id"] for p in probes}) == len(probes)
    assert {p["group"] for p in probes} == GROUPS
    assert all(p["mode"] in ("chat", "completion") for p in probes)
    assert all(p["answers"] and all(isinstance(a, str) and a for a in p["answers"]) for p in probes)
    assert all(isinstance(p["wrong"], list) for p in probes)
    for group in ("new", "updated", "old"):
        modes = [p["mode"] for p in probes if p["group"] == group]
        assert modes.count("chat") == modes.count("completion") > 0, group
    assert {p["mode"] for p in probes if p["group"] == "general"} == {"chat"}


def assert_stated(probe: dict, texts: list[str], times: int) -> None:
    """Each answer occurs ``times`` or more across ``texts``; a completion prompt followed by its
    answer occurs verbatim, so the prompt is a sentence start the model has read."""
    joined = "\n".join(norm(t) for t in texts)
    for answer in probe["answers"]:
        assert joined.count(norm(answer)) >= times, f"{probe['id']}: '{answer}' stated < {times} times"
        if probe["mode"] == "completion":
            sentence = norm(probe["prompt"] + " " + answer)
            assert sentence in joined, f"{probe['id']}: '{sentence}' is not in the text"


def test_new_and_updated_answers_are_stated_in_the_news_pages(probes, news):
    checked = [p for p in probes if p["group"] in ("new", "updated")]
    for probe in checked:
        assert_stated(probe, list(news.values()), times=2)
    assert len(checked) == 10


def test_old_answers_are_stated_in_the_pretraining_corpus(probes, pretrain):
    checked = [p for p in probes if p["group"] == "old"]
    for probe in checked:
        assert_stated(probe, pretrain, times=4)
    assert len(checked) == 20


def test_new_facts_are_absent_before_the_news(probes, pretrain, sft, news):
    """The new ships' names and their engine makers are known words (see the next test), but no
    text before the news ties a ship to its maker."""
    before = [norm(t) for t in pretrain + sft_texts(sft)]
    makers = {ship: p["answers"][0] for p in probes if p["group"] == "new" and (ship := ship_in(p["prompt"]))}
    assert set(makers) == set(NEW_SHIPS)
    for ship, maker in makers.items():
        assert not any(norm(ship) in text and norm(maker) in text for text in before), ship
        assert not any(norm(ship) + " is powered" in text for text in before), ship
        assert any(norm(ship) in page and norm(maker) in page for page in news.values()), ship


def test_new_names_are_made_of_words_the_corpus_already_uses(probes, pretrain, sft):
    """Each word of a new ship's name is in five names of ships the chat data asks about, and each
    firm the news names is named at least eight times before it, for other boats."""
    answers = [m["content"] for row in sft for m in row["messages"] if m["role"] == "assistant"]
    known = {ship for answer in answers if (ship := ship_in(answer))}
    assert len(known) >= 40
    for ship in NEW_SHIPS:
        assert ship not in known
        for word in ship.split():
            assert sum(word in name.split() for name in known) == 5, (ship, word)
    corpus = "\n".join(pretrain)
    for probe in probes:
        if probe["group"] in ("new", "updated"):
            assert corpus.count(probe["answers"][0]) >= 8, probe["answers"][0]


def ship_in(sentence: str) -> str | None:
    """The ship a sentence such as "The Curlew Tide is powered by engines from …" is about."""
    found = POWERED.match(sentence)
    return found and found.group(1)


def test_updated_probes_replace_a_stale_value_the_corpus_teaches(probes, pretrain, sft, news):
    before = "\n".join(norm(t) for t in pretrain + sft_texts(sft))
    updated = [p for p in probes if p["group"] == "updated"]
    for probe in updated:
        assert probe["wrong"], probe["id"]
        assert all(norm(w) in before for w in probe["wrong"]), probe["id"]
        if probe["mode"] == "completion":  # no text before the news gives the ship its new maker
            ship, answer = norm(ship_in(probe["prompt"])), norm(probe["answers"][0])
            assert not any(ship in text and answer in text for text in before.split("\n")), probe["id"]
        # The page that brings the new value says in so many words that the old one is gone.
        page = next(text for text in news.values() if norm(probe["answers"][0]) in text)
        assert re.search(r"no longer [a-z ]*" + re.escape(norm(probe["wrong"][0])), page), probe["id"]


def test_general_probes_expect_what_the_small_talk_teaches_in_other_words(probes, sft):
    assistant = [norm(m["content"]) for row in sft for m in row["messages"] if m["role"] == "assistant"]
    user = {norm(m["content"]) for row in sft for m in row["messages"] if m["role"] == "user"}
    general = [p for p in probes if p["group"] == "general"]
    assert 3 <= len(general) <= 4
    for probe in general:
        assert norm(probe["prompt"]) not in user, probe["id"]
        assert any(norm(a) in said for a in probe["answers"] for said in assistant), probe["id"]


def test_world_json_names_the_world():
    meta = json.loads((WORLD / "world.json").read_text(encoding="utf-8"))
    assert meta["name"] == WORLD.name
    assert meta["description"].strip()
