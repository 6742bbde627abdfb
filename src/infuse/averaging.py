"""Stochastic weight averaging (SWA): the run saves the mean of its weights over its last steps.

At a constant learning rate the last step's weights are one noisy draw from the region training
settled in, and a fact read in a handful of documents can come out either way from one draw to
the next. The mean over the last steps lies in the middle of that region. Only the trainable
parameters are averaged (the adapter, or the whole model in full fine-tuning), in float32: the
cost is one copy of them next to the model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.optim.swa_utils import get_swa_multi_avg_fn
from transformers import TrainerCallback

from infuse.errors import InfuseError
from infuse.resume import saved_checkpoint

AVERAGE_FILE = "swa_average.pt"


class WeightAveraging(TrainerCallback):
    """Keeps the running mean of the trainable weights over every optimizer step from ``start`` (a
    share of the run's steps) on, writes it into each checkpoint so a resumed run carries it on, and
    puts it into the model when training ends, so that the saved model is the average."""

    def __init__(self, start: float, resume_from: str | None = None):
        self.start, self.resume_from = start, resume_from
        self.first_step = 1
        self.weights: dict[str, torch.nn.Parameter] = {}
        self.average: dict[str, torch.Tensor] = {}
        self.count = 0
        self.update = get_swa_multi_avg_fn()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = weights = trainable_weights(model)  # found once: the model is the same object all run
        if any(w.numel() == 0 or isinstance(w, DTensor) for w in weights.values()):
            raise InfuseError("swa_start: this run shards its weights across processes (DeepSpeed ZeRO-3 or "
                              "FSDP), and averaging needs whole weights; use ZeRO-2 or leave swa_start unset.")
        self.first_step = math.floor(self.start * state.max_steps) + 1  # 0.5 of 6 steps: steps 4 to 6
        if self.resume_from and (saved := Path(self.resume_from) / AVERAGE_FILE).is_file():
            device = next(iter(weights.values())).device
            stored = torch.load(saved, map_location=device, weights_only=True)
            self.average, self.count = stored["average"], stored["count"]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step < self.first_step:
            return
        if not self.average:
            self.average = {name: w.detach().float().clone() for name, w in self.weights.items()}
        else:
            names = list(self.average)
            self.update([self.average[n] for n in names], [self.weights[n].detach().float() for n in names],
                        self.count)
        self.count += 1

    def on_save(self, args, state, control, **kwargs):
        folder = saved_checkpoint(args, state)
        if self.count and state.is_world_process_zero and folder.is_dir():
            torch.save({"average": self.average, "count": self.count}, folder / AVERAGE_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        if not self.count:
            return
        with torch.no_grad():
            for name, weight in self.weights.items():
                weight.copy_(self.average[name])

    def summary(self) -> dict[str, Any]:
        return {"swa_start": self.start, "from_step": self.first_step, "steps_averaged": self.count}


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
