"""How long `infuse eval` takes for 100 probes x 2 tiny models, and what batching buys.

Two randomly initialised tiny Llamas (configs/tiny-llama.json, seeds 0 and 1, with a 2048-entry
tokenizer trained here) never stop on their own, so every answer runs the seed's default
max_new_tokens of 200: the worst case for a run with default settings. 100 probes, half chat (through
the ChatML template) and half completion, four groups.

Measured:
- the whole `infuse eval` command (a subprocess, so imports and loading count), default settings;
- tokens per second of the batched generation it ran (--batch-size 16), against the baseline of one
  prompt at a time (batch size 1) on the first 10 probes, in the same run.

    .venv/bin/python benchmarks/eval_speed.py [--probes 100] [--baseline-probes 10]

Prints one JSON line and writes it to results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import DATA, REPO, random_model, save_result
from rich.console import Console
from transformers import AutoTokenizer

from infuse.evaluate import EvalSettings, evaluate, load_probes
from infuse.tokenizer import train_tokenizer

WORDS = "the capital river cluster runs founder mascot lake city market weather chip company of is".split()


def build_models(folder: Path) -> dict[str, str]:
    train_tokenizer([DATA / "wiki_demo.txt", DATA / "c4_demo.jsonl"], 2048, folder / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    models = {}
    for seed in (0, 1):
        path = folder / f"tiny-{seed}"
        random_model(path, REPO / "configs" / "tiny-llama.json", tokenizer, seed)
        models[f"tiny{seed}"] = str(path)
    return models


def write_probes(path: Path, count: int) -> Path:
    rows = []
    for i in range(count):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(4 + i % 9)]
        rows.append({"id": f"p{i}", "group": ("new", "updated", "old", "general")[i % 4],
                     "mode": "chat" if i % 2 else "completion", "prompt": " ".join(words).capitalize(),
                     "answers": ["Quellport"], "wrong": ["heron"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def time_cli(models: dict[str, str], probes: Path, output: Path) -> float:
    command = [sys.executable, "-m", "infuse.cli", "eval", "--probes", str(probes), "--output", str(output)]
    for name, path in models.items():
        command += ["--model", f"{name}={path}"]
    started = time.time()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "COLUMNS": "120"})
    return time.time() - started


def tokens_per_second(report: dict) -> float:
    tokens = sum(m["generated_tokens"] for m in report["models"].values())
    seconds = sum(t["generate"] for t in report["timing"]["models"].values())
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=100)
    parser.add_argument("--baseline-probes", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="infuse-eval-bench-") as tmp:
        folder = Path(tmp)
        models = build_models(folder)
        probes = write_probes(folder / "probes.jsonl", args.probes)
        wall = time_cli(models, probes, folder / "report")
        report = json.loads((folder / "report" / "report.json").read_text())
        first = {"tiny0": models["tiny0"]}
        baseline = evaluate(first, load_probes(probes)[: args.baseline_probes],
                            settings=EvalSettings(batch_size=1), console=Console(quiet=True))
    batched, single = tokens_per_second(report), tokens_per_second(baseline)
    result = {
        "benchmark": "eval_speed", "probes": args.probes, "models": len(models),
        "max_new_tokens": report["generation"]["max_new_tokens"],
        "batch_size": report["settings"]["batch_size"],
        "cli_wall_seconds": round(wall, 1), "eval_total_seconds": report["timing"]["total_seconds"],
        "generate_seconds": {n: t["generate"] for n, t in report["timing"]["models"].items()},
        "generated_tokens": sum(m["generated_tokens"] for m in report["models"].values()),
        "tokens_per_second_batched": round(batched, 1), "tokens_per_second_batch1": round(single, 1),
        "speedup_vs_batch1": round(batched / single, 2), "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2), "torch_threads": torch.get_num_threads(),
    }
    save_result("eval_speed", result)


if __name__ == "__main__":
    main()
