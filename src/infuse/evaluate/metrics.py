"""Scores: per model and probe group, how often the answer was right (any of ``answers``) and how
often it said a known-wrong thing (any of ``wrong``); and for chat probes, whether the model kept
the chat format (stopped at end-of-turn, no template markers in the answer)."""

from __future__ import annotations

from infuse.evaluate.generate import Generation
from infuse.evaluate.probes import Probe, contains_any

COUNTS = ("n", "correct", "scored", "wrong_hits", "with_wrong")


def score(probe: Probe, answer: Generation) -> dict:
    """One model's output for one probe as report.json stores it."""
    return {
        "text": answer.text,
        "correct": contains_any(answer.text, probe.answers) if probe.answers else False,
        "wrong": contains_any(answer.text, probe.wrong) if probe.wrong else False,
        "stopped": answer.stopped,
        "leaked": list(answer.leaked),
        "tokens": answer.tokens,
    }


def group_metrics(probes: list[Probe], scored: dict[str, dict]) -> dict[str, dict]:
    """``{group: {n, correct, accuracy, wrong_hits, wrong_rate}}`` over the probes a model answered.
    Accuracy counts only probes that have answers; wrong rate only probes that name wrong ones."""
    groups: dict[str, dict] = {}
    for probe in probes:
        if probe.id not in scored:
            continue
        row = groups.setdefault(probe.group, dict.fromkeys(COUNTS, 0))
        out = scored[probe.id]
        row["n"] += 1
        if probe.answers:
            row["scored"] += 1
            row["correct"] += out["correct"]
        if probe.wrong:
            row["with_wrong"] += 1
            row["wrong_hits"] += out["wrong"]
    return {name: _rates(row) for name, row in groups.items()}


def _rates(row: dict) -> dict:
    return {
        "n": row["n"],
        "accuracy": row["correct"] / row["scored"] if row["scored"] else 0.0,
        "wrong_rate": row["wrong_hits"] / row["with_wrong"] if row["with_wrong"] else 0.0,
        "correct": row["correct"],
        "wrong_hits": row["wrong_hits"],
        "with_answers": row["scored"],
        "with_wrong": row["with_wrong"],
    }


def adherence(probes: list[Probe], scored: dict[str, dict]) -> dict | None:
    """Chat-format adherence over a model's chat probes: the share that ended at end-of-turn before
    ``max_new_tokens`` and leaked no template marker. None when the model answered no chat probe."""
    chat = [scored[p.id] for p in probes if p.mode == "chat" and p.id in scored]
    if not chat:
        return None
    known = [out for out in chat if out["stopped"] is not None]
    ended = sum(1 for out in known if out["stopped"])
    leaked = sum(1 for out in chat if out["leaked"])
    kept = sum(1 for out in known if out["stopped"] and not out["leaked"])
    return {
        "n": len(chat),
        "ended_at_turn_end": ended / len(known) if known else None,
        "leaked_template_tokens": leaked / len(chat),
        "rate": kept / len(known) if known else None,
        "unknown_stop": len(chat) - len(known),
    }


def findings(report: dict) -> list[str]:
    """Plain sentences on what the numbers show, per group: the ranking by accuracy and who said
    known-wrong answers. They go into report.md and the page as the first thing a reader sees."""
    lines = []
    models = report["models"]
    for group in report["groups"]:
        ranked = sorted(((m["groups"][group], name) for name, m in models.items() if group in m["groups"]),
                        key=lambda pair: -pair[0]["accuracy"])
        if not ranked:
            continue
        parts = [f"{name} {percent(g['accuracy'])} ({g['correct']}/{g['with_answers']})" for g, name in ranked]
        line = f"{group}: " + ", ".join(parts) + "." + _leader(ranked)
        hits = [f"{name} {g['wrong_hits']}/{g['with_wrong']}" for g, name in ranked if g["wrong_hits"]]
        if hits:
            line += " Known-wrong answers given: " + ", ".join(hits) + "."
        lines.append(line)
    return lines


def _leader(ranked: list[tuple[dict, str]]) -> str:
    """Who scores highest and by how much over the next model down, or that nobody does."""
    if len(ranked) < 2:
        return ""
    best = ranked[0][0]["accuracy"]
    top = [name for g, name in ranked if g["accuracy"] == best]
    below = next(((g, name) for g, name in ranked if g["accuracy"] < best), None)
    if below is None:
        return " No model scores higher than the others."
    if len(top) == 1:
        who = f"{top[0]} scores highest"
    else:
        who = f"{', '.join(top[:-1])} and {top[-1]} share the top score"
    return f" {who}, {100 * (best - below[0]['accuracy']):.1f} percentage points above {below[1]}."


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def shown_wrong_rate(group: dict | None) -> float | None:
    """A group's wrong rate for tables and charts; None where none of its probes names a wrong
    answer (report.json still stores 0.0 there, which would read as "never wrong")."""
    return group["wrong_rate"] if group and group.get("with_wrong") else None
