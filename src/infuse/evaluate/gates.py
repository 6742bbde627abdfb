"""CI gates: conditions on the report's numbers, such as

    chat_ft.old.accuracy < 0.95 * chat.old.accuracy

that fail the run (exit 3) when they hold. The grammar is deliberately tiny and parsed by hand
(never ``eval``)::

    condition := side OP side          OP: < <= > >= == !=
    side      := term ((" + " | " - ") term)*     (+ and - need spaces: names may contain '-')
    term      := factor ("*" factor)*
    factor    := NUMBER | MODEL.GROUP.METRIC | MODEL.perplexity.DATASET | MODEL.adherence.KEY

METRIC is accuracy, wrong_rate or n; KEY is rate, ended_at_turn_end or leaked_template_tokens.
Model, group and dataset names are matched against the report, so they may contain dots.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from infuse.errors import InfuseError

COMPARISONS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
               "<": operator.lt, ">": operator.gt}
GROUP_METRICS = ("accuracy", "wrong_rate", "n")
ADHERENCE_KEYS = ("rate", "ended_at_turn_end", "leaked_template_tokens")
NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


@dataclass
class Gate:
    """A parsed condition: each side a sum of signed products of numbers and report references."""

    text: str
    left: list[tuple[int, list[str]]]
    op: str
    right: list[tuple[int, list[str]]]


@dataclass
class GateResult:
    condition: str
    failed: bool
    left: float
    right: float
    values: dict[str, float]

    def explain(self) -> str:
        names = ", ".join(f"{k} = {v:.6g}" for k, v in self.values.items())
        verdict = "holds, so the gate fails" if self.failed else "does not hold"
        return f"{self.condition}: {self.left:.6g} vs {self.right:.6g} ({names}); the condition {verdict}"

    def to_dict(self) -> dict:
        return {"condition": self.condition, "failed": self.failed, "left": self.left, "right": self.right,
                "values": self.values}


def parse_gate(text: str) -> Gate:
    """Split a condition into its two sides and operator; syntax errors are InfuseErrors."""
    match = re.fullmatch(r"\s*(.+?)\s*(<=|>=|==|!=|<|>)\s*(.+?)\s*", text)
    if not match or any(op in match.group(3) for op in COMPARISONS):
        raise InfuseError(f"--fail-if {text!r}: expected one comparison, LEFT OP RIGHT with OP one of "
                          f"{' '.join(COMPARISONS)}, e.g. 'chat_ft.old.accuracy < 0.95 * chat.old.accuracy'.")
    return Gate(text, _side(match.group(1), text), match.group(2), _side(match.group(3), text))


def _side(side: str, text: str) -> list[tuple[int, list[str]]]:
    terms, sign = [], 1
    for piece in re.split(r"\s+([+-])\s+", side.strip()):
        if piece in ("+", "-"):
            sign = 1 if piece == "+" else -1
            continue
        factors = [f.strip() for f in piece.split("*")]
        if not all(factors):
            raise InfuseError(f"--fail-if {text!r}: '{piece}' has an empty factor around '*'.")
        terms.append((sign, factors))
    return terms


def resolve(name: str, report: dict, text: str = "") -> float:
    """The number a factor stands for: a literal or a reference into ``report``."""
    if NUMBER.fullmatch(name):
        return float(name)
    models = report["models"]
    model = next((m for m in sorted(models, key=len, reverse=True) if name.startswith(m + ".")), None)
    if model is None:
        raise InfuseError(f"--fail-if {text!r}: '{name}' names no model; models are {', '.join(models)}. "
                          "Write MODEL.GROUP.METRIC, MODEL.perplexity.DATASET or MODEL.adherence.rate.")
    rest = name[len(model) + 1:]
    section, _, key = rest.partition(".")
    if section == "perplexity":
        perplexity = models[model].get("perplexity", {})
        return _lookup(perplexity, key, f"{model}.perplexity", text, "held-out dataset")
    if section == "adherence":
        found = models[model].get("adherence")
        if not found:
            raise InfuseError(f"--fail-if {text!r}: {model} answered no chat probe, so it has no adherence "
                              "figures.")
        value = _lookup(found, key, f"{model}.adherence", text, "adherence figure", ADHERENCE_KEYS)
        if value is None:
            raise InfuseError(f"--fail-if {text!r}: {name} is unknown (the endpoint did not say why "
                              "answers ended).")
        return value
    group, _, metric = rest.rpartition(".")
    if metric not in GROUP_METRICS:
        raise InfuseError(f"--fail-if {text!r}: '{name}': the metric '{metric}' is not one of "
                          f"{', '.join(GROUP_METRICS)}.")
    groups = models[model]["groups"]
    return float(_lookup(groups, group, model, text, "probe group")[metric])


def _lookup(table: dict, key: str, owner: str, text: str, what: str, known: tuple[str, ...] = ()):
    if key not in table:
        names = ", ".join(known or tuple(table)) or "none"
        raise InfuseError(f"--fail-if {text!r}: {owner} has no {what} '{key}' (known: {names}).")
    return table[key]


def check_gate(gate: Gate, report: dict) -> GateResult:
    """Evaluate ``gate`` on ``report``: ``failed`` is True when its condition holds."""
    values: dict[str, float] = {}

    def total(side: list[tuple[int, list[str]]]) -> float:
        result = 0.0
        for sign, factors in side:
            product = float(sign)
            for factor in factors:
                value = resolve(factor, report, gate.text)
                if not NUMBER.fullmatch(factor):
                    values[factor] = value
                product *= value
            result += product
        return result

    left, right = total(gate.left), total(gate.right)
    return GateResult(gate.text, bool(COMPARISONS[gate.op](left, right)), left, right, values)


def check_gates(conditions: list[str], report: dict) -> list[GateResult]:
    """Parse and evaluate every condition; unknown names and bad syntax raise InfuseError."""
    return [check_gate(parse_gate(text), report) for text in conditions]
