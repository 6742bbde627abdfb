"""The report: report.json (schema in report.schema.json), report.md, and report.html.

``report.schema.json`` beside this file is the JSON Schema report.json follows; tests validate
against it, and so can anyone who reads the report with other tools.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from infuse.errors import InfuseError
from infuse.evaluate.metrics import percent, shown_wrong_rate

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def read_runs(runs: list[str | Path] | dict[str, str | Path]) -> dict[str, dict]:
    """Loss curves of training output dirs (their ``infuse_run.json``): ``{name: {path, loss:
    [[step, loss], ...], eval_loss: [...], train_loss}}``, named after the dir unless given names."""
    from infuse.train import MANIFEST

    named = runs if isinstance(runs, dict) else _unique_names(runs)
    out = {}
    for name, folder in named.items():
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise InfuseError(f"--runs {folder}: no {MANIFEST} there; give the output_dir of a finished "
                              "`infuse train` run.")
        manifest = json.loads(path.read_text())
        history = manifest.get("log_history", [])
        out[name] = {
            "path": str(folder),
            "stage": manifest.get("stage"),
            "loss": _curve(history, "loss"),
            "eval_loss": _curve(history, "eval_loss"),
            "train_loss": (manifest.get("metrics") or {}).get("train_loss"),
        }
    return out


def _unique_names(folders: list[str | Path]) -> dict[str, str | Path]:
    """Each run named after its dir; a second ``run`` becomes ``run-2``."""
    named: dict[str, str | Path] = {}
    for folder in folders:
        base = Path(folder).resolve().name or str(folder)
        name, n = base, 2
        while name in named:
            name, n = f"{base}-{n}", n + 1
        named[name] = folder
    return named


def _curve(history: list[dict], key: str) -> list[list[float]]:
    return [[entry["step"], entry[key]] for entry in history
            if isinstance(entry.get(key), (int, float)) and "step" in entry]


def write_report(report: dict, output: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html into ``output``; returns their paths."""
    from infuse.evaluate.html import render_html

    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "report.json", "md": folder / "report.md", "html": folder / "report.html"}
    text = json.dumps(clean_numbers(report), indent=2, ensure_ascii=False)
    paths["json"].write_text(text, encoding="utf-8")
    paths["md"].write_text(render_markdown(report), encoding="utf-8")
    paths["html"].write_text(render_html(report), encoding="utf-8")
    return paths


def clean_numbers(value):
    """NaN and infinity are not JSON: they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_numbers(v) for v in value]
    return value


# ---------------------------------------------------------------- markdown


def render_markdown(report: dict) -> str:
    """report.md: findings, the score table, perplexity, adherence, gates, then every probe."""
    models, groups = list(report["models"]), report["groups"]
    lines = ["# infuse evaluation", "", _settings_line(report), ""]
    if report.get("findings"):
        lines += ["## Findings", "", *[f"- {line}" for line in report["findings"]], ""]
    lines += ["## Accuracy (wrong rate) per group", "", _row(["model", *groups]),
              _row(["---"] * (len(groups) + 1))]
    for name in models:
        cells = [_cell(report["models"][name]["groups"].get(g)) for g in groups]
        lines.append(_row([name, *cells]))
    lines += [""] + _perplexity_md(report) + _adherence_md(report) + _gates_md(report) + _probes_md(report)
    return "\n".join(lines) + "\n"


def _settings_line(report: dict) -> str:
    gen = report["generation"]
    return (f"{len(report['probes'])} probes, {len(report['models'])} models; max_new_tokens "
            f"{gen['max_new_tokens']}, temperature {gen['temperature']}, top_p {gen['top_p']}"
            f"{' (greedy)' if gen.get('greedy') else ''}; "
            f"{report.get('timing', {}).get('total_seconds', '?')} s.")


def _cell(metrics: dict | None) -> str:
    if not metrics:
        return "–"
    wrong = shown_wrong_rate(metrics)
    return f"{percent(metrics['accuracy'])} ({'–' if wrong is None else percent(wrong)}) n={metrics['n']}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def _perplexity_md(report: dict) -> list[str]:
    datasets = report.get("heldout", {})
    if not datasets:
        return []
    lines = ["## Perplexity on held-out text", "", _row(["model", *datasets]),
             _row(["---"] * (len(datasets) + 1))]
    for name, model in report["models"].items():
        values = [model.get("perplexity", {}).get(d) for d in datasets]
        lines.append(_row([name, *[f"{v:.3f}" if v is not None else "–" for v in values]]))
    return lines + [""]


def _adherence_md(report: dict) -> list[str]:
    rows = [(n, m["adherence"]) for n, m in report["models"].items() if m.get("adherence")]
    if not rows:
        return []
    lines = ["## Chat format", "", _row(["model", "chat probes", "ended at end-of-turn", "leaked template",
                                           "kept format"]), _row(["---"] * 5)]
    for name, a in rows:
        lines.append(_row([name, a["n"], _share(a["ended_at_turn_end"]), _share(a["leaked_template_tokens"]),
                           _share(a["rate"])]))
    return lines + [""]


def _share(value: float | None) -> str:
    return "unknown" if value is None else f"{100 * value:.0f}%"


def _gates_md(report: dict) -> list[str]:
    gates = report.get("gates") or []
    if not gates:
        return []
    return ["## Gates", "", *[f"- {'FAILED' if g['failed'] else 'ok'}: `{g['condition']}` "
                              f"({g['left']:.6g} vs {g['right']:.6g})" for g in gates], ""]


def _probes_md(report: dict) -> list[str]:
    models = list(report["models"])
    lines = ["## Every probe", "", _row(["id", "group", "mode", "prompt", "answers", *models]),
             _row(["---"] * (5 + len(models)))]
    for probe in report["probes"]:
        cells = []
        for name in models:
            out = probe["outputs"].get(name)
            mark = "–" if out is None else ("✔ " if out["correct"] else "✘ ") + ("⚠ " if out["wrong"] else "")
            cells.append(mark + (out["text"].strip()[:160] if out else ""))
        lines.append(_row([probe["id"], probe["group"], probe["mode"], probe["prompt"],
                           " / ".join(probe["answers"]), *cells]))
    return lines


# ---------------------------------------------------------------- terminal


def print_summary(report: dict, console) -> None:
    """The score table and findings on the terminal."""
    from rich.table import Table

    title = "Accuracy (wrong rate) per group"
    table = Table(title=title, min_width=len(title))  # a narrow table would wrap its title
    table.add_column("model")
    for group in report["groups"]:
        table.add_column(group, justify="right")
    datasets = list(report.get("heldout", {}))
    for dataset in datasets:
        table.add_column(f"ppl {dataset}", justify="right")
    for name, model in report["models"].items():
        ppl = [model.get("perplexity", {}).get(d) for d in datasets]
        table.add_row(name, *[_cell(model["groups"].get(g)) for g in report["groups"]],
                      *[f"{v:.3f}" if v is not None else "–" for v in ppl])
    console.print(table)
    for line in report.get("findings", []):
        console.print(f"• {line}", highlight=False)
