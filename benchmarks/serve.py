"""Serving: completions per second and latency of ``infuse serve`` under 16 concurrent clients,
against the seed's way of generating (a transformers ``pipeline("text-generation")`` called once
per prompt, one after another) on the same model and prompts, in one run.

The model is a 4-layer Llama of about 5M parameters built here from a config, with a byte-level
BPE tokenizer trained on wiki_demo (random weights: throughput does not depend on what the
weights say). Every request is greedy with the same max_new_tokens, so both sides do the same
work; the run also checks that both give the same text for every prompt.

    .venv/bin/python benchmarks/serve.py [--clients 16] [--requests-per-client 2] [--max-new-tokens 64]

Prints one JSON line and writes it to results/serve.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from common import DATA, random_model, save_result
from transformers import AutoTokenizer, pipeline

from infuse.serve import start_server
from infuse.tokenizer import train_tokenizer

MODEL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024,
         "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


def build_model(folder: Path, vocab_size: int = 4096) -> int:
    """Tokenizer + randomly initialised Llama saved in ``folder``; returns the parameter count."""
    return random_model(folder, MODEL, train_tokenizer([DATA / "wiki_demo.txt"], vocab_size, folder))


def prompts(count: int) -> list[str]:
    """Opening words of wiki_demo lines, 4 to 40 words long, all different."""
    lines = [words for words in map(str.split, (DATA / "wiki_demo.txt").read_text().splitlines())
             if len(words) > 40]
    return [" ".join(lines[i % len(lines)][: 4 + (i * 7) % 37]) for i in range(count)]


def run_pipeline(folder: Path, texts: list[str], max_new_tokens: int) -> tuple[list[str], list[float], float]:
    """The seed's way: one pipeline call per prompt, in order."""
    generator = pipeline("text-generation", model=str(folder), tokenizer=str(folder), device="cpu")
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "return_full_text": False}
    generator(texts[0], **settings)  # warm-up
    outputs, latencies = [], []
    started = time.perf_counter()
    for text in texts:
        begin = time.perf_counter()
        outputs.append(generator(text, **settings)[0]["generated_text"])
        latencies.append(time.perf_counter() - begin)
    return outputs, latencies, time.perf_counter() - started


def run_server(folder: Path, texts: list[str], clients: int,
               max_new_tokens: int) -> tuple[list[str], list[float], float, dict]:
    """``clients`` threads, each posting its share of the prompts one after another."""
    with start_server({"bench": str(folder)}, max_batch_size=clients) as server:
        http = httpx.Client(base_url=server.url, timeout=600, limits=httpx.Limits(max_connections=clients))

        def ask(text: str) -> tuple[str, float]:
            begin = time.perf_counter()
            reply = http.post("/generate", json={"inputs": text, "parameters": {
                "max_new_tokens": max_new_tokens, "do_sample": False}})
            reply.raise_for_status()
            return reply.json()["generated_text"], time.perf_counter() - begin

        ask(texts[0])  # warm-up
        engine = server.registry.engines[0]
        passes, rows = engine.stats["forward_passes"], engine.stats["batched_rows"]
        shares = [texts[i::clients] for i in range(clients)]
        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            answers = list(pool.map(lambda share: [ask(text) for text in share], shares))
        elapsed = time.perf_counter() - started
        batch = (engine.stats["batched_rows"] - rows) / max(1, engine.stats["forward_passes"] - passes)
        http.close()
    by_text = {text: answer for share, replies in zip(shares, answers, strict=True)
               for text, answer in zip(share, replies, strict=True)}
    return [by_text[t][0] for t in texts], [by_text[t][1] for t in texts], elapsed, {"mean_batch_rows": batch}


def figures(latencies: list[float], elapsed: float) -> dict:
    ordered = sorted(latencies)
    return {"completions_per_s": round(len(latencies) / elapsed, 3), "wall_s": round(elapsed, 2),
            "p50_latency_s": round(statistics.median(ordered), 3),
            "p95_latency_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory(prefix="infuse-bench-serve-") as tmp:
        folder = Path(tmp)
        parameters = build_model(folder)
        texts = prompts(args.clients * args.requests_per_client)
        base_out, base_lat, base_wall = run_pipeline(folder, texts, args.max_new_tokens)
        served_out, served_lat, served_wall, engine = run_server(folder, texts, args.clients,
                                                                 args.max_new_tokens)
        prompt_tokens = [len(AutoTokenizer.from_pretrained(folder)(t).input_ids) for t in texts]

    server, baseline = figures(served_lat, served_wall), figures(base_lat, base_wall)
    result = {
        "benchmark": "serve",
        "model": {"parameters": parameters, **MODEL},
        "requests": len(texts), "clients": args.clients, "max_new_tokens": args.max_new_tokens,
        "prompt_tokens": {"min": min(prompt_tokens), "max": max(prompt_tokens)},
        "infuse_serve": server | engine,
        "pipeline_sequential": baseline,
        "throughput_ratio": round(server["completions_per_s"] / baseline["completions_per_s"], 2),
        "identical_outputs": f"{sum(a == b for a, b in zip(served_out, base_out, strict=True))}/{len(texts)}",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_1min": round(os.getloadavg()[0], 2), "platform": platform.platform(),
                    "torch": torch.__version__},
    }
    save_result("serve", result)


if __name__ == "__main__":
    main()
