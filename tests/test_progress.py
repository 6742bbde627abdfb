"""The training bar: drawn from the loop itself, ends on the last step, prints the logged losses."""

from __future__ import annotations

import io
import threading
from types import SimpleNamespace

from rich.console import Console

from infuse.progress import RichProgress


def test_the_bar_runs_without_a_thread_and_shows_each_logged_loss_and_the_last_step():
    out = io.StringIO()
    callback = RichProgress(Console(file=out, force_terminal=True, width=120))
    state = SimpleNamespace(is_world_process_zero=True, max_steps=3, global_step=0)
    threads = threading.active_count()
    callback.on_train_begin(None, state, None)
    assert threading.active_count() == threads  # rich's refresh thread would compete with the loop
    for step in (1, 2, 3):
        state.global_step = step
        callback.on_step_end(None, state, None)
        callback.on_log(None, state, None, logs={"loss": 4.0 - step, "learning_rate": 1e-3})
    callback.on_train_end(None, state, None)
    text = out.getvalue()
    assert [f"step      {step}  loss {4.0 - step:#.4g}" in text for step in (1, 2, 3)] == [True] * 3
    assert "3/3" in text


def test_an_80_column_terminal_keeps_the_step_count_the_loss_and_the_times_whole():
    out = io.StringIO()
    callback = RichProgress(Console(file=out, force_terminal=True, width=80))
    state = SimpleNamespace(is_world_process_zero=True, max_steps=10_000, global_step=0)
    callback.on_train_begin(None, state, None)
    state.global_step = 9_655
    callback.on_step_end(None, state, None)
    callback.on_log(None, state, None, logs={"loss": 4.29312, "grad_norm": 0.771123, "learning_rate": 5.888e-06,
                                             "epoch": 3.91})
    bar = out.getvalue().split("\r")[-1]
    assert "9655/10000" in bar and "loss 4.293" in bar and "…" not in bar
    assert bar.count("0:00:") == 2 or "-:--:--" in bar  # elapsed, and remaining
    assert "step   9655  loss 4.293  grad_norm 0.7711  learning_rate 5.888e-06" in out.getvalue()
    callback.on_log(None, state, None, logs={"eval_loss": 4.51234, "eval_runtime": 0.2, "epoch": 3.91})
    assert "step   9655  eval_loss 4.512\n" in out.getvalue()
    callback.on_log(None, state, None, logs={"loss": 2.0, "learning_rate": 0.003})
    assert "step   9655  loss 2.000  learning_rate 0.003\n" in out.getvalue()
