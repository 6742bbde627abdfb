"""Evaluation data split off the training data (``val_size``), and what an eval loss averages over."""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc
from rich.console import Console

from infuse.data.pretrain import IGNORE_INDEX
from infuse.errors import InfuseError


def hold_out(dataset, val_size: float, seed: int, unit: str, console: Console):
    """``(train, eval)``: ``val_size`` (a share, or a number when 1 or more) of ``dataset``'s rows,
    drawn with ``seed``, held out from training."""
    size = val_size if val_size < 1 else int(val_size)
    try:
        split = dataset.train_test_split(test_size=size, seed=seed)
    except ValueError:
        raise InfuseError(f"val_size: {val_size} of {len(dataset)} {unit} leaves no {unit} to evaluate on or no "
                          f"{unit} to train on. Choose a share or number in between.") from None
    console.print(f"Held out {len(split['test']):,} of {len(dataset):,} {unit} for evaluation (val_size "
                  f"{val_size}); they are not trained on.", highlight=False)
    return split["train"], split["test"]


def eval_counts(dataset, config) -> dict[str, Any]:
    """What the eval loss averages over: rows, and the tokens it scores (a label, and not the first
    of a row: nothing predicts that one)."""
    labels = pc.list_flatten(pc.list_slice(dataset.with_format("arrow")["labels"], 1))
    scored = pc.sum(pc.not_equal(labels, IGNORE_INDEX)).as_py() or 0
    origin = {"val_size": config.val_size} if config.val_size else {"eval_dataset": config.eval_dataset}
    return {**origin, "rows": len(dataset), "scored_tokens": int(scored)}
