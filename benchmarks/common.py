"""What every benchmark shares: where the data is, a randomly initialised model for a tokenizer,
and printing the result line and writing it to results/NAME.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from infuse.logs import library_bars_only_in_a_terminal

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

library_bars_only_in_a_terminal()  # as infuse's own commands: a benchmark's log is its JSON line, not tqdm redraws


def random_model(folder: Path, shape: dict | Path, tokenizer, seed: int = 0) -> int:
    """A model of ``shape`` (config values, or a config JSON) with the tokenizer's vocabulary and
    special ids, randomly initialised from ``seed`` and saved with the tokenizer in ``folder``;
    returns its parameter count. Speed does not depend on what the weights say."""
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if isinstance(shape, dict):
        config = AutoConfig.for_model(**{**shape, **ids})
    else:
        config = AutoConfig.from_pretrained(shape, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def save_result(name: str, result: dict) -> None:
    """Print ``result`` as one JSON line and write it to results/NAME.json."""
    line = json.dumps(result)
    print(line)
    out = REPO / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(line + "\n")
