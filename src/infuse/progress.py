"""Terminal progress for training: a rich bar with the latest loss; every logged metric as a line."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

ON_BAR = ("loss", "train_loss")
PRINTED = ("loss", "grad_norm", "learning_rate", "eval_loss")


def metrics_text(logs: dict, names: tuple[str, ...]) -> str:
    return "  ".join(f"{k} {_number(k, logs[k])}" for k in names if k in logs)


def _number(name: str, value) -> str:
    """Four significant digits; a loss keeps its trailing zeros (2.000, not 2), so losses line up."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:#.4g}" if name.endswith("loss") else f"{value:.4g}"


class RichProgress(TrainerCallback):
    """Replaces the Trainer's tqdm bar. Logged metrics are printed as lines; the bar keeps only the
    latest loss, and its own width gives way first, so that the step count and the times stay
    whole in an 80-column terminal.

    The bar is redrawn from the training loop, at most every ``REDRAW_SECONDS``, not by rich's
    refresh thread: on a GPU the loop is Python launching kernels, and a thread drawing ten times a
    second would compete with it for the interpreter lock."""

    REDRAW_SECONDS = 0.25

    def __init__(self, console: Console | None = None):
        self.console = console or Console()
        self.progress: Progress | None = None
        self.task = None
        self.drawn_at = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(bar_width=None),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            auto_refresh=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, metrics="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            if time.monotonic() - self.drawn_at >= self.REDRAW_SECONDS:
                self.redraw()

    def redraw(self):
        self.progress.refresh()
        self.drawn_at = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        on_bar = metrics_text(logs, ON_BAR)
        if on_bar:
            self.progress.update(self.task, metrics=on_bar)
            self.redraw()
        if "loss" in logs or "eval_loss" in logs:
            self.progress.console.print(f"step {state.global_step:>6}  {metrics_text(logs, PRINTED)}",
                                        highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None
