"""``infuse demo``: the four-model knowledge-infusion experiment, end to end on a CPU.

A world (generated, or a folder the user wrote) gives a general corpus, chat data, announcement
pages and probes. The demo trains a tokenizer, pretrains a tiny base model, fine-tunes it into a
chat model, ingests the announcement pages over HTTP, infuses them into both models with QLoRA
continued pretraining, serves the four models from one ``infuse serve`` process, asks each its
probes over HTTP and writes the comparison report.

Each stage writes to its own folder under ``--output`` and is skipped when it already finished,
so a rerun picks up where the last one stopped.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from infuse.config import TrainConfig, config_from_dict
from infuse.errors import InfuseError
from infuse.world import generate_world, write_world

WORLD_FILES = ("pretrain.jsonl", "sft.jsonl", "probes.jsonl")
GROUP_ORDER = ["new", "updated", "old", "general"]


@dataclass
class DemoSettings:
    """Sizes and training settings of the demo; a world.json ``settings`` object overrides them."""

    hidden_size: int = 128
    """Width of the tiny Llama built from scratch (4 heads, 2 key/value heads)."""
    layers: int = 4
    vocab_size: int = 1024
    """Entries of the byte-level BPE tokenizer trained on the world's corpus."""
    pretrain_epochs: int = 20
    pretrain_lr: float = 3e-3
    pretrain_shuffles: int = 3
    """Sentence-shuffled copies of each corpus document (``sentence_shuffles``): facts stored this way
    can be recalled outside the sentence order they were read in. The base model's replay pool during
    infusion has as many (``replay_sentence_shuffles``): replaying the corpus only in its documents'
    own order, it forgot old facts asked outside that order, as the probes ask them. The chat model's
    pool has none: there the copies would outnumber its chat data, and with them it kept a re-engined
    ship's old maker."""
    sft_epochs: int = 20
    sft_lr: float = 3e-3
    infuse_epochs: int = 15
    infuse_lr: float = 1e-3
    infuse_shuffles: int = 20
    """Sentence-shuffled copies of each page. With 20 instead of 10 the hand-written world's chat model
    named the new maker of every re-engined ship over four training seeds (with 10, 10 of 16 over
    eight seeds), at twice the steps."""
    base_move_openers: bool = True
    """In the base model's shuffled copies, move a short opening phrase to the end of half the
    sentences (``move_openers``). The hand-written world's base model read "From this week, the
    Thistle Rose is powered by engines from Sundgren" and went on completing "The Thistle Rose is
    powered by engines from" with the old maker: right on one of four training seeds, three of four
    with the phrases moved. The chat model's copies keep them: moved, it named the Teal Queen's old
    maker on two of the four seeds (none without)."""
    chat_sentence_turns: int = 5
    """Chat turns made of each page sentence for the chat model (``sentence_turns``). Asked about a
    re-engined ship, the hand-written world's chat model gave the maker its chat data had taught it,
    while the same infused model completed the page's sentence with the new maker. Over six
    training seeds the turns lifted its new ships from 14 to 18 of 18 and its re-engined ones from
    8 to 10 of 12, and cut the old maker from 5 to 3 of 12, for 40% more steps."""
    infuse_swa_start: float | None = 0.5
    """Save the mean of the adapter's weights over the second half of infusion (``swa_start``): the
    last step's weights are one noisy draw, and whether a fact read in five pages comes out right
    changed with it from one training seed to the next."""
    lora_rank: int = 16
    replay_ratio: float = 0.8
    """Share of replay blocks (the world's corpus; for the chat model its chat data too) in each epoch
    of infusion, against forgetting: the pages are few, so most of each epoch rehearses."""
    replay_skip_subjects: bool = True
    """Leave out replay documents about what the pages change, so replay does not restate stale facts."""
    train_seed: int = 42
    """``seed`` of every training stage: the order blocks come in, the replay drawn each epoch, the
    adapter's initialisation. With ``--base`` and ``--chat`` only the infusions train, which is how
    the README's tables over training seeds were made."""
    max_new_tokens: int = 48
    """Answers in the demo worlds are one sentence (up to about 30 tokens with names the tokenizer
    splits); the seed's 200 would only add time."""


# Fewer, faster steps for CI: a higher infusion learning rate makes up for the fewer epochs. No
# weight averaging: over six epochs at that rate, the chat model averaged over the second half
# lost one of its three small-talk answers. Two chat turns per sentence: with five, the turns were
# most of the chat model's pages and its infusion took three times as long.
QUICK = DemoSettings(pretrain_epochs=10, sft_epochs=10, infuse_epochs=6, infuse_shuffles=5, infuse_lr=3e-3,
                     infuse_swa_start=None, chat_sentence_turns=2)


def run_demo(
    output: str | Path = "out/demo",
    quick: bool = False,
    world: str | Path | None = None,
    base: str | None = None,
    chat: str | None = None,
    seed: int = 0,
    families: int = 48,
    vocabulary: str = "birds",
    train_seed: int | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run every stage; return the report (also written to ``output/report``). Without ``world``,
    a world of ``families`` old instance families is generated from ``seed`` and ``vocabulary``.
    ``train_seed`` replaces the settings' ``train_seed``."""
    from infuse.logs import quiet_progress_bars

    console = console or Console()
    out = Path(output)
    if bool(base) != bool(chat):
        raise InfuseError("--base and --chat go together: give both your base model and its chat model.")
    stages = Stages(console)
    with quiet_progress_bars():
        world_dir = stages.run("world", lambda: prepare_world(world, out / "world", seed, families, vocabulary))
        check_world_unchanged(world_dir, out)
        settings = demo_settings(world_dir, quick)
        if train_seed is not None:
            settings = replace(settings, train_seed=train_seed)
        models = {"base": base, "chat": chat} if base else build_models(out, world_dir, settings, stages)
        docs = stages.run("ingest pages", lambda: ingest_pages(world_dir / "news", out / "news.jsonl", console))
        for name, path in models.items():
            config = infuse_config(name, path, out / f"{name}-infused", docs, world_dir, settings)
            stages.run(f"infuse {name}", lambda config=config: train_once(config, console))
        specs = {**models, **{f"{name}+infused": f"{path}+{out / f'{name}-infused'}" for name, path in models.items()}}
        runs = {name: out / name for name in ("base", "chat")} | {f"{n}+infused": out / f"{n}-infused" for n in models}
        report = stages.run("serve and evaluate",
                            lambda: evaluate_models(specs, world_dir, out / "report", runs, settings, console))
    console.print("Stage times (s): " + ", ".join(f"{k} {v}" for k, v in stages.timings.items()))
    summary = {"timings": stages.timings, "settings": asdict(settings), "models": specs}
    (out / "demo.json").write_text(json.dumps(summary, indent=1))
    return report


class Stages:
    """Runs the demo's stages under a heading each and records their wall times."""

    def __init__(self, console: Console):
        self.console = console
        self.timings: dict[str, float] = {}

    def run(self, name: str, func: Callable[[], Any]) -> Any:
        self.console.rule(f"[bold]{name}")
        started = time.time()
        result = func()
        self.timings[name] = round(time.time() - started, 1)
        return result


def build_models(out: Path, world_dir: Path, settings: DemoSettings, stages: Stages) -> dict[str, str]:
    """A tokenizer, a base model pretrained on the world's corpus, and its chat fine-tune."""
    stages.run("tokenizer", lambda: build_tokenizer(world_dir, out / "tokenizer", settings))
    stages.run("pretrain base", lambda: train_once(pretrain_config(out, world_dir, settings), stages.console))
    stages.run("fine-tune chat", lambda: train_once(sft_config(out, world_dir, settings), stages.console))
    return {"base": str(out / "base"), "chat": str(out / "chat")}


# ---------------------------------------------------------------- world


def prepare_world(world: str | Path | None, target: Path, seed: int, families: int, vocabulary: str) -> Path:
    """The user's world folder, checked; or a generated one written to ``target`` (and reused there
    when it was generated with the same options)."""
    if world is None:
        return generated_world(target, seed, families, vocabulary)
    folder = Path(world).expanduser()
    missing = [name for name in WORLD_FILES if not (folder / name).is_file()]
    if not (folder / "news").is_dir() or not any((folder / "news").glob("*.html")):
        missing.append("news/*.html")
    if missing:
        raise InfuseError(
            f"World folder {folder} lacks {', '.join(missing)}. A world folder holds "
            "pretrain.jsonl, sft.jsonl, news/*.html and probes.jsonl (README: Probes and world folders)."
        )
    return folder


def generated_world(target: Path, seed: int, families: int, vocabulary: str) -> Path:
    meta = target / "world.json"
    if not meta.is_file():
        return write_world(generate_world(seed, families=families, vocabulary=vocabulary), target)
    found = json.loads(meta.read_text())
    made = (found.get("seed"), len(found.get("old", [])), found.get("vocabulary"))
    if made != (seed, families, vocabulary):
        raise InfuseError(
            f"{target} holds a world generated with seed {made[0]}, {made[1]} families and vocabulary "
            f"{made[2]}, not the one asked for. Give the demo another --output folder, or delete this one."
        )
    return target


def check_world_unchanged(world_dir: Path, out: Path) -> None:
    """Stop when the world's files changed since ``out`` was made from them: its finished stages
    (tokenizer, models, ingested pages) would be reused, though made from the old files."""
    record = out / "world_files.json"
    found = world_digests(world_dir)
    if not record.is_file():
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(found, indent=1))
        return
    made = json.loads(record.read_text())
    changed = sorted(name for name in made.keys() | found.keys() if made.get(name) != found.get(name))
    if changed:
        raise InfuseError(f"{out} was made from other contents of {world_dir} ({', '.join(changed)} changed, "
                          "added or removed since). Give the demo another --output folder, or delete this one "
                          "to make it again.")


def world_digests(world_dir: Path) -> dict[str, str]:
    files = [world_dir / name for name in (*WORLD_FILES, "world.json")] + sorted((world_dir / "news").glob("*.html"))
    return {path.relative_to(world_dir).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in files if path.is_file()}


def demo_settings(world_dir: Path, quick: bool) -> DemoSettings:
    settings = QUICK if quick else DemoSettings()
    meta = world_dir / "world.json"
    overrides = json.loads(meta.read_text()).get("settings", {}) if meta.is_file() else {}
    known = {f.name for f in fields(DemoSettings)}
    unknown = set(overrides) - known
    if unknown:
        raise InfuseError(
            f"{meta}: unknown settings {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}."
        )
    return replace(settings, **overrides)


# ---------------------------------------------------------------- training stages


def build_tokenizer(world_dir: Path, output: Path, settings: DemoSettings) -> None:
    from infuse.tokenizer import train_tokenizer

    if not (output / "tokenizer.json").is_file():
        train_tokenizer([world_dir / "pretrain.jsonl"], settings.vocab_size, output)


def model_config(out: Path, settings: DemoSettings) -> Path:
    path = out / "model.json"
    path.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": settings.hidden_size,
                "intermediate_size": 3 * settings.hidden_size,
                "num_hidden_layers": settings.layers,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 512,
                "rms_norm_eps": 1e-6,
                "tie_word_embeddings": False,
                "vocab_size": settings.vocab_size,
            }
        )
    )
    return path


def common(output_dir: Path, cache: Path, settings: DemoSettings) -> dict[str, Any]:
    return {
        "output_dir": str(output_dir),
        "cache_dir": str(cache),
        "seed": settings.train_seed,
        "report_to": "none",
        "logging_steps": 20,
        "save_steps": 500,
        "save_total_limit": 1,
    }


def pretrain_config(out: Path, world_dir: Path, settings: DemoSettings) -> TrainConfig:
    return config_from_dict(
        {
            **common(out / "base", out / "cache", settings),
            "model_config": str(model_config(out, settings)),
            "tokenizer_name_or_path": str(out / "tokenizer"),
            "dataset": [str(world_dir / "pretrain.jsonl")],
            "finetuning_type": "full",
            "block_size": 128,
            "num_train_epochs": settings.pretrain_epochs,
            "sentence_shuffles": settings.pretrain_shuffles,
            "per_device_train_batch_size": 8,
            "learning_rate": settings.pretrain_lr,
            "warmup_steps": 0.05,
        }
    )


def sft_config(out: Path, world_dir: Path, settings: DemoSettings) -> TrainConfig:
    return config_from_dict(
        {
            **common(out / "chat", out / "cache", settings),
            "stage": "sft",
            "model_name_or_path": str(out / "base"),
            "dataset": [str(world_dir / "sft.jsonl")],
            "finetuning_type": "full",
            "cutoff_len": 256,
            "num_train_epochs": settings.sft_epochs,
            "per_device_train_batch_size": 8,
            "learning_rate": settings.sft_lr,
            "warmup_steps": 0.05,
        }
    )


def infuse_config(
    name: str, model: str, output_dir: Path, docs: Path, world_dir: Path, settings: DemoSettings
) -> TrainConfig:
    """QLoRA continued pretraining of model ``name`` ("base" or "chat") on the ingested pages.

    Both rehearse the world's corpus while they learn, and the chat model its own chat data too
    (rendered in its chat template), so it keeps answering in turns and stopping at end-of-turn
    instead of drifting into document prose. The base model replays the corpus with as many
    sentence-shuffled copies as it was pretrained with, and its shuffled copies move opening phrases;
    the chat model also reads each page sentence as its answer in a few chat turns (see
    ``DemoSettings``).
    """
    is_base = name == "base"
    replay = [world_dir / "pretrain.jsonl"] + ([] if is_base else [world_dir / "sft.jsonl"])
    return config_from_dict(
        {
            **common(output_dir, output_dir.parent / "cache", settings),
            "model_name_or_path": model,
            "dataset": [str(docs)],
            "finetuning_type": "qlora",
            "lora_rank": settings.lora_rank,
            "lora_alpha": 2 * settings.lora_rank,
            "lora_dropout": 0.0,
            "block_size": 64,
            "replay_dataset": [str(path) for path in replay],
            "replay_ratio": settings.replay_ratio,
            "replay_skip_subjects": settings.replay_skip_subjects,
            "replay_sentence_shuffles": settings.pretrain_shuffles if is_base else 0,
            "num_train_epochs": settings.infuse_epochs,
            "sentence_shuffles": settings.infuse_shuffles,
            "move_openers": settings.base_move_openers and is_base,
            "sentence_turns": 0 if is_base else settings.chat_sentence_turns,
            "swa_start": settings.infuse_swa_start,
            "per_device_train_batch_size": 4,
            "learning_rate": settings.infuse_lr,
            "lr_scheduler_type": "constant",
            "warmup_steps": 0,
        }
    )


def train_once(config: TrainConfig, console: Console) -> None:
    """Train, unless ``config.output_dir`` holds a finished run of the same settings (then reuse it)."""
    from infuse.resume import describe_changes, run_fingerprint
    from infuse.train import MANIFEST, run

    manifest = Path(config.output_dir) / MANIFEST
    if not manifest.is_file():
        run(config, console)
        return
    trained = json.loads(manifest.read_text())["config"]
    asked = config.to_dict()
    shared = trained.keys() & asked.keys()  # a key added by a later infuse version is not a change
    changes = describe_changes(run_fingerprint({k: trained[k] for k in shared}, ""),
                               run_fingerprint({k: asked[k] for k in shared}, ""))
    if changes:
        raise InfuseError(f"{config.output_dir} was trained with other settings ({'; '.join(changes)}). "
                          "Give the demo another --output folder, or delete this one to train it again.")
    console.print(f"{config.output_dir} already trained; reusing it.")


# ---------------------------------------------------------------- ingestion over HTTP


@contextmanager
def serve_folder(folder: Path):
    """Serve ``folder`` on a free loopback port for as long as the block runs."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the signature is the base class's
        pass


def ingest_pages(news: Path, output: Path, console: Console) -> Path:
    from infuse.ingest import IngestOptions, ingest, print_report

    if output.is_file():
        console.print(f"{output} already ingested; reusing it.")
        return output
    with serve_folder(news) as url:
        urls = [f"{url}/{page.name}" for page in sorted(news.glob("*.html"))]
        report = ingest(urls, output, IngestOptions(retries=0, timeout=5), console=console)
    print_report(report, console)
    return output


# ---------------------------------------------------------------- serve and evaluate


def evaluate_models(
    specs: dict[str, str],
    world_dir: Path,
    output: Path,
    runs: dict[str, Path],
    settings: DemoSettings,
    console: Console,
) -> dict[str, Any]:
    """Serve the four models from one server and ask each its probes over HTTP: base models get
    the completion probes through TGI's ``/generate`` with the seed's payload, chat models the chat
    probes through ``/v1/chat/completions``, which applies their chat template on the server."""
    from infuse.evaluate import EvalSettings, GenerationSettings, evaluate
    from infuse.serve import start_server

    modes = {name: "chat" if name.startswith("chat") else "completion" for name in specs}
    eval_settings = EvalSettings(generation=GenerationSettings(max_new_tokens=settings.max_new_tokens))
    with start_server(specs) as server:
        console.print(f"Serving {', '.join(specs)} at [bold]{server.url}[/bold]")
        endpoints = {
            name: f"{server.url}/{'v1' if mode == 'chat' else 'generate'}#{name}"
            for name, mode in modes.items()
        }
        report = evaluate(
            endpoints,
            world_dir / "probes.jsonl",
            output,
            eval_settings,
            modes=modes,
            runs={name: path for name, path in runs.items() if (path / "infuse_run.json").is_file()},
            console=console,
        )
    print_four_models(report, console)
    return report


def print_four_models(report: dict[str, Any], console: Console) -> None:
    """The experiment in one table: accuracy per probe group (and stale answers) for each model."""
    groups = sorted(
        {g for model in report["models"].values() for g in model["groups"]},
        key=lambda g: (GROUP_ORDER + [g]).index(g),
    )
    title = "What each model knows (accuracy; stale answers in brackets)"
    table = Table(title=title, min_width=len(title))  # a narrow table would wrap its title
    table.add_column("model")
    for group in groups:
        table.add_column(group, justify="right")
    for name, model in report["models"].items():
        cells = []
        for group in groups:
            metrics = model["groups"].get(group)
            if not metrics or not metrics["n"]:
                cells.append("-")
                continue
            stale = f" ({metrics['wrong_rate']:.0%})" if metrics.get("wrong_rate") else ""
            cells.append(f"{metrics['accuracy']:.0%}{stale}")
        table.add_row(name, *cells)
    console.print(table)
