"""Pretraining packing: tokens kept and tokens per second, infuse vs the classic ``group_texts`` recipe.

The recipe (as in transformers' ``run_clm.py`` of the seed): ``Dataset.map`` tokenizes in batches,
then a second batched ``map`` joins each batch with ``sum(lists, [])`` and drops the batch's
remainder (``total_length // block_size * block_size``). infuse packs the same documents with EOS
between them and keeps the last partial block, padded and masked.

Both start from the same list of texts (c4_demo + wiki_demo) and the same tokenizer (byte-level
BPE, 8000 entries, trained here). Throughput is the documents' tokens (the same number for both)
over wall time; each measurement is repeated and the median and best are reported. No cache.

    .venv/bin/python benchmarks/pack.py [--repeats 5] [--block-sizes 2048 512]

Prints one JSON line and writes it to results/pack.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from functools import partial

import datasets
from common import DATA, save_result
from datasets import Dataset
from transformers import AutoTokenizer

from infuse.data.pretrain import load_texts, pack_documents
from infuse.tokenizer import train_tokenizer

SOURCES = [DATA / "c4_demo.jsonl", DATA / "wiki_demo.txt"]


def group_texts_recipe(texts: list[str], tokenizer, block_size: int) -> Dataset:
    """The seed's way: tokenize, then concatenate each batch with ``sum`` and drop its remainder."""

    def tokenize(examples):
        return tokenizer(examples["text"])

    def group_texts(examples):
        concatenated = {k: sum(examples[k], []) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // block_size) * block_size
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    tokenized = Dataset.from_dict({"text": texts}).map(tokenize, batched=True, remove_columns=["text"])
    return tokenized.map(group_texts, batched=True)


def timed(function, repeats: int) -> tuple[object, list[float]]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return result, times


def measure(texts: list[str], tokenizer, block_size: int, repeats: int, document_tokens: int) -> dict:
    """Both ways at one block size: tokens kept, tokens per second (median and best), the ratios."""
    ours_fn = partial(pack_documents, texts, tokenizer, block_size)
    recipe_fn = partial(group_texts_recipe, texts, tokenizer, block_size)
    ours_fn(), recipe_fn()  # warm up both (imports, tokenizer caches) before timing
    (packed, stats), ours_times = timed(ours_fn, repeats)
    recipe, recipe_times = timed(recipe_fn, repeats)
    # The EOS separators are counted out: both sides are measured in the documents' own tokens.
    kept_ours = sum(map(sum, packed["attention_mask"])) - stats.documents
    kept_recipe = len(recipe) * block_size
    ours = _summary(kept_ours, document_tokens, ours_times)
    theirs = _summary(kept_recipe, document_tokens, recipe_times)
    ours.update(blocks=stats.blocks, separators=stats.documents, padding=stats.padding)
    theirs.update(blocks=len(recipe), dropped_tokens=document_tokens - kept_recipe)
    return {
        "block_size": block_size,
        "infuse": ours,
        "group_texts": theirs,
        "throughput_ratio_median": round(ours["tokens_per_s_median"] / theirs["tokens_per_s_median"], 2),
        "throughput_ratio_best": round(ours["tokens_per_s_best"] / theirs["tokens_per_s_best"], 2),
    }


def _summary(kept: int, document_tokens: int, times: list[float]) -> dict:
    return {
        "tokens_kept": kept,
        "tokens_kept_pct": round(100 * kept / document_tokens, 3),
        "seconds_median": round(statistics.median(times), 4),
        "seconds_best": round(min(times), 4),
        "tokens_per_s_median": round(document_tokens / statistics.median(times)),
        "tokens_per_s_best": round(document_tokens / min(times)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[2048, 512])
    args = parser.parse_args()
    datasets.disable_progress_bars()

    with tempfile.TemporaryDirectory() as folder:
        train_tokenizer(SOURCES, 8000, folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = load_texts(SOURCES)
    document_tokens = sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"]))
    result = {
        "benchmark": "pack",
        "corpus": [path.name for path in SOURCES],
        "documents": len(texts),
        "document_tokens": document_tokens,
        "vocab_size": len(tokenizer),
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        "runs": [measure(texts, tokenizer, size, args.repeats, document_tokens) for size in args.block_sizes],
    }
    save_result("pack", result)


if __name__ == "__main__":
    main()
