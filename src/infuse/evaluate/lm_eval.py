"""lm-evaluation-harness on the local models (``--lm-eval TASKS``), when the ``eval`` extra is
installed (``pip install 'infuse-llm[eval]'``). The loaded model is handed to lm-eval's HFLM as it
is, so adapters count; tasks of your own come from ``--lm-eval-include DIR`` (task YAMLs)."""

from __future__ import annotations

import functools
import logging
import math

from infuse.errors import InfuseError

INSTALL_HINT = "pip install 'infuse-llm[eval]'"


def available() -> str | None:
    """None when lm-eval can be imported, else why not."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        return f"lm-evaluation-harness is not installed ({e}); {INSTALL_HINT}"
    return None


def run_lm_eval(model, tokenizer, tasks: list[str], include_path: str | None = None,
                limit: float | None = None, batch_size: int = 8, seed: int = 0) -> dict[str, dict]:
    """``{task: {metric: value}}`` from ``lm_eval.simple_evaluate`` on an already loaded model."""
    reason = available()
    if reason:
        raise InfuseError(f"--lm-eval {','.join(tasks)}: {reason}.")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    manager = task_manager(include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise InfuseError(f"--lm-eval: no task named {', '.join(unknown)} in lm-eval{where}. Give task "
                          "names as `lm-eval ls tasks` lists them, or a folder of task YAMLs with "
                          "--lm-eval-include.")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                      log_samples=False, random_seed=seed, numpy_random_seed=seed,
                                      torch_random_seed=seed, fewshot_random_seed=seed, bootstrap_iters=0)
    return {task: _numbers(metrics) for task, metrics in (results or {}).get("results", {}).items()}


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None):
    """lm-eval's task index, built once per include path (indexing every task YAML takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def _numbers(metrics: dict) -> dict[str, float]:
    """Numeric metrics only (lm-eval also returns aliases and 'N/A' stderrs), keyed without ',none'."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key.removesuffix(",none")] = float(value)
    return out
