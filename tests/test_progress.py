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
    assert [f"step      {step}  loss {4.0 - step:.4g}" in text for step in (1, 2, 3)] == [True] * 3
    assert "3/3" in text
