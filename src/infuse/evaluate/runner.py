"""``infuse eval`` as a recipe: read probes → for each model: load, answer, score, measure
perplexity (and lm-eval) → build the report → write it → check the gates.

Which probes a model gets: every model gets every probe, unless ``modes`` limits it to one mode
(``--only NAME=chat``; e.g. chat probes for chat models and completion probes for base models, as
the demo does). A probe a model cannot take (a chat probe for a tokenizer without a chat template,
or for TGI's raw ``/generate``) is skipped for that model and the reason is recorded; its group
scores count only the probes it answered.

Models are evaluated one after another, so only one is in memory at a time.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from infuse import __version__
from infuse.errors import InfuseError
from infuse.evaluate.endpoint import Endpoint, is_endpoint
from infuse.evaluate.gates import check_gates
from infuse.evaluate.generate import Backend, GenerationSettings, LocalModel
from infuse.evaluate.metrics import adherence, findings, group_metrics, score
from infuse.evaluate.probes import MODES, Probe, load_probes
from infuse.evaluate.report import read_runs, write_report
from infuse.logs import quiet_progress_bars
from infuse.models import adapter_differences, split_spec


@dataclass
class EvalSettings:
    """Everything about an evaluation but the models and the probes."""

    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Decoding settings (max_new_tokens, temperature, top_p, seed)."""
    batch_size: int = 16
    """Prompts per local generate call (and requests in flight per endpoint). A batch runs until its
    longest answer ends, so larger batches mostly pay off when answers run to max_new_tokens."""
    block_size: int = 512
    """Tokens per held-out block for perplexity (capped at the model's context)."""
    heldout_max_blocks: int | None = None
    """Perplexity on only the first blocks of each held-out set (all when None)."""
    dtype: str | None = None
    """Weights dtype for local models (default: as saved)."""
    device: str | None = None
    """Device for local models (default: the GPU when there is one)."""
    api_key: str | None = None
    """Bearer token for endpoints (default: $INFUSE_API_KEY)."""
    timeout: float = 300.0
    """Seconds an endpoint may take for one answer."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks to run on local models."""
    lm_eval_include: str | None = None
    """A folder of lm-eval task YAMLs of your own."""
    lm_eval_limit: float | None = None
    """Examples per lm-eval task (all when None)."""

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("api_key")  # never written into a report
        return out


def evaluate(models: dict[str, str], probes: str | Path | list[Probe], output: str | Path | None = None,
             settings: EvalSettings | None = None, modes: dict[str, str] | None = None,
             heldout: list[str | Path] | None = None,
             runs: list[str | Path] | dict[str, str | Path] | None = None, gates: list[str] | None = None,
             console: Console | None = None) -> dict:
    """Evaluate ``models`` (``{name: "PATH[+ADAPTER]" or "http://host:port"}``) on ``probes`` and
    return the report dict; when ``output`` is given, also write report.json/.md/.html there.

    ``modes`` limits a model to ``chat`` or ``completion`` probes; ``heldout`` files give a
    perplexity each; ``runs`` (training output dirs) give loss curves; ``gates`` are ``--fail-if``
    conditions, whose results land in ``report["gates"]`` (the caller decides what a failure does).
    """
    settings = settings or EvalSettings()
    console = console or Console()
    started = time.time()
    settings.generation.check()
    probe_list = probes if isinstance(probes, list) else load_probes(probes)
    _check_models(models, modes or {})
    texts = read_heldout(heldout or [])
    run_curves = read_runs(runs or [])
    check_gates(gates or [], skeleton(models, probe_list, texts))  # names and syntax, before the slow part

    with quiet_progress_bars():
        results = {name: evaluate_model(name, spec, probe_list, (modes or {}).get(name), texts, settings,
                                        console) for name, spec in models.items()}
    report = build_report(results, probe_list, texts, run_curves, settings, started)
    report["gates"] = [g.to_dict() for g in check_gates(gates or [], report)]
    if output is not None:
        paths = write_report(report, output)
        console.print(f"Report: [bold]{paths['html']}[/bold] (and report.json, report.md)")
    return report


def _check_models(models: dict[str, str], modes: dict[str, str]) -> None:
    if not models:
        raise InfuseError("No model to evaluate: give at least one --model NAME=PATH[+ADAPTER] or NAME=URL.")
    for name, mode in modes.items():
        if name not in models:
            raise InfuseError(f"--only {name}={mode}: no model named {name} (models: {', '.join(models)}).")
        if mode not in MODES:
            raise InfuseError(f"--only {name}={mode}: the mode is 'chat' or 'completion'.")


def read_heldout(paths: list[str | Path]) -> dict[str, dict]:
    """``{dataset name: {path, texts}}``; the name is the file's stem, made unique with a suffix."""
    from infuse.data.pretrain import load_texts

    out: dict[str, dict] = {}
    for path in map(Path, paths):
        if not path.exists():
            raise InfuseError(f"--heldout {path}: no such file or folder.")
        name, n = path.stem, 2
        while name in out:
            name, n = f"{path.stem}-{n}", n + 1
        out[name] = {"path": str(path), "texts": load_texts([path])}
    return out


def skeleton(models: dict[str, str], probes: list[Probe], heldout: dict[str, dict]) -> dict:
    """A report of the right shape with zeros, for checking gate names before anything runs."""
    groups = {p.group: {"n": 0, "accuracy": 0.0, "wrong_rate": 0.0} for p in probes}
    zeros = {"rate": 0.0, "ended_at_turn_end": 0.0, "leaked_template_tokens": 0.0}
    return {"models": {name: {"groups": groups, "perplexity": dict.fromkeys(heldout, 0.0), "adherence": zeros}
                       for name in models}}


def open_backend(name: str, spec: str, settings: EvalSettings) -> Backend:
    if is_endpoint(spec):
        return Endpoint(name, spec, api_key=settings.api_key or os.environ.get("INFUSE_API_KEY"),
                        timeout=settings.timeout, concurrency=settings.batch_size)
    return LocalModel(spec, batch_size=settings.batch_size, dtype=settings.dtype, device=settings.device)


def evaluate_model(name: str, spec: str, probes: list[Probe], only: str | None, heldout: dict[str, dict],
                   settings: EvalSettings, console: Console) -> dict:
    """One model's answers, scores, perplexities and timings."""
    seconds: dict[str, float] = {}
    if not is_endpoint(spec):
        for note in adapter_differences(*split_spec(spec)):
            console.print(f"[yellow]{escape(name)}: {escape(note)}", highlight=False)
    clock = time.time()
    backend = open_backend(name, spec, settings)
    seconds["load"] = time.time() - clock
    try:
        skipped = {mode: f"--only {name}={only}" if only and mode != only else backend.unsupported(mode)
                   for mode in MODES}
        asked = [p for p in probes if not skipped[p.mode]]
        clock = time.time()
        scored = answer_probes(name, backend, asked, settings.generation, console)
        seconds["generate"] = time.time() - clock
        result = {"spec": spec, "backend": backend.kind, "scored": scored,
                  "skipped": {m: r for m, r in skipped.items() if r and any(p.mode == m for p in probes)}}
        clock = time.time()
        result.update(measure_perplexity(backend, heldout, settings))
        seconds["perplexity"] = time.time() - clock
        if settings.lm_eval_tasks:
            clock = time.time()
            result.update(run_lm_eval_on(backend, settings))
            seconds["lm_eval"] = time.time() - clock
    finally:
        backend.close()
    result["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return result


def answer_probes(name: str, backend: Backend, probes: list[Probe], generation: GenerationSettings,
                  console: Console) -> dict[str, dict]:
    """``{probe id: scored output}``, generated in batches of one mode, shorter prompts together."""
    scored: dict[str, dict] = {}
    with Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(name, total=len(probes))
        for mode in MODES:
            todo = sorted((p for p in probes if p.mode == mode), key=lambda p: len(p.prompt))
            for start in range(0, len(todo), backend.batch_size):
                batch = todo[start:start + backend.batch_size]
                answers = backend.generate([p.prompt for p in batch], mode, generation)
                for probe, answer in zip(batch, answers, strict=True):
                    scored[probe.id] = score(probe, answer)
                progress.advance(task, len(batch))
    return scored


def measure_perplexity(backend: Backend, heldout: dict[str, dict], settings: EvalSettings) -> dict:
    if not heldout:
        return {}
    if not isinstance(backend, LocalModel):
        return {"perplexity": {}, "perplexity_skipped": "an endpoint returns text, not the token "
                "probabilities perplexity needs; evaluate the model from its files"}
    details = {name: backend.perplexity(data["texts"], settings.block_size, settings.heldout_max_blocks)
               for name, data in heldout.items()}
    return {"perplexity": {name: d["perplexity"] for name, d in details.items()},
            "perplexity_details": details}


def run_lm_eval_on(backend: Backend, settings: EvalSettings) -> dict:
    from infuse.evaluate.lm_eval import run_lm_eval

    if not isinstance(backend, LocalModel):
        return {"lm_eval_skipped": "lm-eval runs on local models only"}
    return {"lm_eval": run_lm_eval(backend.model, backend.tokenizer, settings.lm_eval_tasks,
                                   settings.lm_eval_include, settings.lm_eval_limit, settings.batch_size,
                                   settings.generation.seed)}


def build_report(results: dict[str, dict], probes: list[Probe], heldout: dict[str, dict],
                 runs: dict[str, dict], settings: EvalSettings, started: float) -> dict:
    """The report dict (see report.schema.json)."""
    models = {}
    for name, result in results.items():
        scored = result["scored"]
        models[name] = {key: value for key, value in result.items() if key != "scored"}
        models[name].update(groups=group_metrics(probes, scored), adherence=adherence(probes, scored),
                            perplexity=result.get("perplexity", {}),
                            generated_tokens=sum(o["tokens"] or 0 for o in scored.values()))
    report = {
        "infuse_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": models,
        "groups": list(dict.fromkeys(p.group for p in probes)),
        "probes": [{**p.to_dict(), "outputs": {n: r["scored"][p.id] for n, r in results.items()
                                               if p.id in r["scored"]}} for p in probes],
        "generation": settings.generation.to_dict(),
        "settings": settings.to_dict(),
        "heldout": {name: {"path": data["path"], "documents": len(data["texts"])}
                    for name, data in heldout.items()},
        "runs": runs,
        "timing": {"total_seconds": round(time.time() - started, 2),
                   "models": {name: r["seconds"] for name, r in results.items()}},
    }
    report["findings"] = findings(report)
    return report
