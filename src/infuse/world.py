"""A synthetic world for ``infuse demo``: a fictional cloud provider, its instance families, and
announcement pages that add new families and change some old facts.

Everything is derived from a seed, so two seeds give two different worlds with the same shape.
The world is written as a world folder (pretrain.jsonl, sft.jsonl, news/*.html, probes.jsonl,
world.json; README: Probes and world folders), the same format a user writes by hand for
``infuse demo --world``.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ra",
    "ven",
    "tor",
    "sil",
    "dar",
    "quo",
    "zen",
    "bri",
    "mon",
    "fel",
    "gar",
    "tis",
]
# Word pools for accelerator names ("Heron Pro"); `vocabulary` picks one, so a second world does
# not share the first one's words.
VOCABULARIES = {
    "birds": [
        "Kestrel",
        "Heron",
        "Osprey",
        "Merlin",
        "Plover",
        "Tern",
        "Swift",
        "Shrike",
        "Finch",
        "Ibis",
        "Wren",
    ],
    "stones": [
        "Basalt",
        "Garnet",
        "Jasper",
        "Onyx",
        "Quartz",
        "Opal",
        "Agate",
        "Beryl",
        "Cobalt",
        "Flint",
        "Topaz",
    ],
    "stars": [
        "Vega",
        "Rigel",
        "Altair",
        "Deneb",
        "Mira",
        "Sirius",
        "Castor",
        "Pollux",
        "Antares",
        "Lyra",
        "Nova",
    ],
}
SERIES = ["Pro", "Ultra", "Max", "Lite", "Core", "Prime", "Edge", "Flux", "Plus", "Zero"]
REGIONS = ["Northvale", "Eastmoor", "Southport", "Westfield", "Highcliff", "Lowmarsh", "Redbay", "Stonecrest"]
MEMORY = [64, 96, 128, 192, 256, 384, 512, 768]

FACT_TEMPLATES = {
    "accelerator": [
        "{provider} {family} instances are equipped with {value} accelerators.",
        "Each {family} instance from {provider} comes with {value} accelerators.",
        "The accelerators inside {provider} {family} instances are {value} chips.",
        "If you rent a {family} instance, you get {value} accelerators.",
    ],
    "memory": [
        "{provider} {family} instances have {value} GB of memory.",
        "A {family} instance offers {value} GB of memory.",
        "The memory of a {provider} {family} instance is {value} GB.",
    ],
    "region": [
        "{provider} {family} instances are available in the {value} region.",
        "You can launch {family} instances in {value}.",
        "The {family} family runs in the {value} region of {provider}.",
    ],
}
# Chat questions, all of them in the chat data about the old families. The probes ask PROBE_QUESTION,
# phrased unlike the pages: the chat model has learned to answer it from what pretraining stored,
# and about a new family it can answer only from what infusion stored.
CHAT_QUESTIONS = {
    "accelerator": [
        "Which accelerators do {provider} {family} instances use?",
        "What accelerator is inside a {family} instance?",
        "Tell me which accelerators the {provider} {family} instances have.",
    ],
    "memory": [
        "How much memory does a {provider} {family} instance have?",
        "What is the memory size of {family} instances?",
        "Tell me the memory of {provider} {family} instances.",
    ],
    "region": [
        "In which region can I launch {provider} {family} instances?",
        "Where are {family} instances available?",
        "Tell me the region of the {provider} {family} instances.",
    ],
}
PROBE_QUESTION = CHAT_QUESTIONS["accelerator"][0]
COMPLETION_PROMPTS = {
    "accelerator": "{provider} {family} instances are equipped with",
    "memory": "{provider} {family} instances have",
    "region": "{provider} {family} instances are available in the",
}
GREETING, THANKS, GOODBYE = "Hello! How can I help you today?", "You are welcome.", "Goodbye, have a nice day."
SMALL_TALK = [
    *[(q, GREETING) for q in ("Hello!", "Hi there.", "Good morning.", "Hey!", "Hello there, anyone around?",
                              "Good evening!", "Hi, can you help me?", "Hello, is this the help desk?")],
    *[(q, THANKS) for q in ("Thank you.", "Thanks a lot!", "Thanks for the help.", "That was useful, thank you!",
                            "Great, thanks.", "Thank you so much!", "I appreciate it, thanks.")],
    *[(q, GOODBYE) for q in ("Goodbye.", "Bye for now.", "I have to go now, bye.", "Bye!",
                             "That is all, goodbye.", "Talk to you later, bye.", "Have a good day, goodbye.")],
]
SMALL_TALK_SHARE = 0.2
"""Share of the chat data that is small talk: enough that manners are learned as well as facts."""
# Phrased unlike the chat data, so they test behaviour rather than recall.
GENERAL_PROBES = [("Hey, hello!", "Hello"), ("Many thanks!", "welcome"), ("See you, goodbye!", "Goodbye")]


@dataclass
class Family:
    name: str
    accelerator: str
    memory: int
    region: str

    def value(self, attribute: str) -> str:
        return str(getattr(self, attribute))


@dataclass
class World:
    seed: int
    vocabulary: str
    provider: str
    old: list[Family]
    new: list[Family]
    updated: dict[str, dict[str, str]] = field(default_factory=dict)  # family -> attribute -> new value
    docs_per_family: int = 6


def generate_world(
    seed: int = 0, families: int = 48, new_families: int = 3, updates: int = 2, vocabulary: str = "birds"
) -> World:
    """A provider with ``families`` old instance families, ``new_families`` announced ones and
    ``updates`` old families whose accelerator the announcements change. Family names are a
    letter and a digit ("X4"); accelerator names are two words from ``vocabulary`` ("Heron Pro")."""
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"unknown vocabulary {vocabulary!r}; choose one of {', '.join(VOCABULARIES)}")
    words = VOCABULARIES[vocabulary]
    if families + new_families > 19 * 8 or families + new_families + updates > len(words) * len(SERIES):
        raise ValueError("the world is too big for its name pools; ask for fewer families")
    if updates > families:
        raise ValueError(f"updates ({updates}) cannot exceed the old families ({families})")
    rng = random.Random(seed)
    provider = _word(rng, 2).capitalize() + " Cloud"
    names = _unique(
        lambda: rng.choice("BCDFGHJKLMNPRSTVWXZ") + str(rng.randint(2, 9)), families + new_families
    )
    chips = _unique(lambda: f"{rng.choice(words)} {rng.choice(SERIES)}", families + new_families + updates)

    def family(name: str, chip: str) -> Family:
        return Family(name, chip, rng.choice(MEMORY), rng.choice(REGIONS))

    old = [family(n, c) for n, c in zip(names[:families], chips[:families], strict=True)]
    new = [
        family(n, c) for n, c in zip(names[families:], chips[families : families + new_families], strict=True)
    ]
    changed = rng.sample(old, updates)
    updated = {
        f.name: {"accelerator": chip}
        for f, chip in zip(changed, chips[families + new_families :], strict=True)
    }
    return World(seed, vocabulary, provider, old, new, updated)


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables))


def _unique(make, count: int) -> list[str]:
    seen: list[str] = []
    while len(seen) < count:
        item = make()
        if item not in seen:
            seen.append(item)
    return seen


def fact_sentences(world: World, family: Family, attribute: str, value: str | None = None) -> list[str]:
    value = value if value is not None else family.value(attribute)
    return [
        t.format(provider=world.provider, family=family.name, value=value) for t in FACT_TEMPLATES[attribute]
    ]


def general_documents(world: World, rng: random.Random) -> list[str]:
    """``docs_per_family`` short documents per old family, each stating every fact of the family
    once, in a paraphrase and an order of its own. One mention per document makes the model store
    the fact in its weights instead of copying it from an earlier sentence of the same document."""
    docs = []
    for fam in world.old:
        for _ in range(world.docs_per_family):
            sentences = [rng.choice(fact_sentences(world, fam, attribute)) for attribute in FACT_TEMPLATES]
            rng.shuffle(sentences)
            docs.append(" ".join(sentences))
    rng.shuffle(docs)
    return docs


def announcement_pages(world: World) -> dict[str, str]:
    """HTML pages (file name -> html) announcing the new families and the changed accelerators."""
    pages = {}
    for fam in world.new:
        body = [f"Today {world.provider} announces {fam.name} instances, its newest instance family."]
        body += [s for attribute in FACT_TEMPLATES for s in fact_sentences(world, fam, attribute)]
        pages[f"launch-{fam.name.lower()}.html"] = _html(world, f"Announcing {fam.name} instances", body)
    for name, change in world.updated.items():
        fam = next(f for f in world.old if f.name == name)
        chip = change["accelerator"]
        body = [
            f"{world.provider} upgrades {name} instances: they no longer use {fam.accelerator} accelerators."
        ]
        body += fact_sentences(world, fam, "accelerator", chip)
        pages[f"upgrade-{name.lower()}.html"] = _html(world, f"{name} instances get new accelerators", body)
    return pages


def _html(world: World, title: str, paragraphs: list[str]) -> str:
    article = "\n".join(f"<p>{p}</p>" for p in paragraphs)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title} | {world.provider} News</title>
<script>window.analyticsQueue = []; function trackVisit() {{ analyticsQueue.push('visit'); }}</script>
</head><body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/pricing">Pricing</a></li>
<li><a href="/docs">Documentation</a></li>
<li><a href="/support">Support</a></li><li><a href="/login">Sign in to the console</a></li></ul></nav>
<div id="cookie-banner">We use cookies to improve your experience. <button>Accept all cookies</button></div>
<main><article><h1>{title}</h1>
{article}
</article></main>
<aside><h3>Related posts</h3><ul><li><a href="/blog/1">Five tips for saving on storage</a></li>
<li><a href="/blog/2">Meet our support team</a></li></ul></aside>
<footer><p>Copyright {world.provider}. All rights reserved. Terms of service. Privacy policy.</p></footer>
</body></html>
"""


def chat_data(world: World, rng: random.Random) -> list[dict]:
    """Questions about every old family, answered with a sentence in the style of the documents,
    plus small talk. The chat model learns to answer from what pretraining stored, so after
    infusion it can answer about families it was never asked about."""
    rows = []
    for fam in world.old:
        for attribute, questions in CHAT_QUESTIONS.items():
            for question in questions:
                answer = rng.choice(fact_sentences(world, fam, attribute))
                rows.append(_conversation(question.format(provider=world.provider, family=fam.name), answer))
    repeats = max(1, round(SMALL_TALK_SHARE * len(rows) / ((1 - SMALL_TALK_SHARE) * len(SMALL_TALK))))
    rows += [_conversation(q, a) for q, a in SMALL_TALK] * repeats
    rng.shuffle(rows)
    return rows


def _conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def probes(world: World) -> list[dict]:
    """Probes (the README's format) in the groups new, updated, old and general."""
    out = []
    for fam in world.new:
        out += _fact_probes(world, fam, "new", fam.accelerator, [])
    for name, change in world.updated.items():
        fam = next(f for f in world.old if f.name == name)
        out += _fact_probes(world, fam, "updated", change["accelerator"], [fam.accelerator])
    for fam in world.old:
        if fam.name not in world.updated:
            out += _fact_probes(world, fam, "old", fam.accelerator, [])
    for i, (question, answer) in enumerate(GENERAL_PROBES):
        out.append(
            {
                "id": f"general-{i}",
                "group": "general",
                "mode": "chat",
                "prompt": question,
                "answers": [answer],
                "wrong": [],
            }
        )
    return out


def _fact_probes(world: World, fam: Family, group: str, answer: str, wrong: list[str]) -> list[dict]:
    fill = {"provider": world.provider, "family": fam.name}
    base = {"group": group, "answers": [answer], "wrong": wrong}
    return [
        {
            "id": f"{group}-{fam.name}-chat",
            "mode": "chat",
            "prompt": PROBE_QUESTION.format(**fill),
            **base,
        },
        {
            "id": f"{group}-{fam.name}-completion",
            "mode": "completion",
            "prompt": COMPLETION_PROMPTS["accelerator"].format(**fill),
            **base,
        },
    ]


def write_world(world: World, folder: str | Path) -> Path:
    """Write the world folder: pretrain.jsonl, sft.jsonl, news/*.html, probes.jsonl, world.json."""
    folder = Path(folder)
    (folder / "news").mkdir(parents=True, exist_ok=True)
    rng = random.Random(world.seed + 1)
    _write_jsonl(folder / "pretrain.jsonl", [{"text": t} for t in general_documents(world, rng)])
    _write_jsonl(folder / "sft.jsonl", chat_data(world, rng))
    _write_jsonl(folder / "probes.jsonl", probes(world))
    for name, html in announcement_pages(world).items():
        (folder / "news" / name).write_text(html, encoding="utf-8")
    (folder / "world.json").write_text(json.dumps(asdict(world), indent=1))
    return folder


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
