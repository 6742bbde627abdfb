"""--fail-if conditions: the tiny grammar, the values they read, and clear errors for bad names."""

from __future__ import annotations

import pytest

from infuse.errors import InfuseError
from infuse.evaluate.gates import check_gates, parse_gate

REPORT = {"models": {
    "chat": {"groups": {"old": {"n": 10, "accuracy": 0.8, "wrong_rate": 0.1}},
             "perplexity": {"wiki.test": 12.5}, "adherence": {"rate": 1.0, "ended_at_turn_end": 1.0,
                                                              "leaked_template_tokens": 0.0}},
    "chat_ft": {"groups": {"old": {"n": 10, "accuracy": 0.7, "wrong_rate": 0.3},
                           "new.facts": {"n": 4, "accuracy": 1.0, "wrong_rate": 0.0}},
                "perplexity": {"wiki.test": 14.0}, "adherence": None},
    "chat-ft.v2": {"groups": {"old": {"n": 10, "accuracy": 0.9, "wrong_rate": 0.0}}, "perplexity": {}},
}}


def one(condition: str):
    (result,) = check_gates([condition], REPORT)
    return result


def test_a_gate_whose_condition_holds_fails_with_its_values():
    result = one("chat_ft.old.accuracy < 0.95 * chat.old.accuracy")
    assert result.failed
    assert result.left == pytest.approx(0.7) and result.right == pytest.approx(0.76)
    assert result.values == {"chat_ft.old.accuracy": 0.7, "chat.old.accuracy": 0.8}
    assert "0.7 vs 0.76" in result.explain()


def test_a_gate_whose_condition_does_not_hold_passes():
    assert not one("chat-ft.v2.old.accuracy < 0.95 * chat.old.accuracy").failed  # 0.9 vs 0.76


@pytest.mark.parametrize("condition, failed", [
    ("chat_ft.perplexity.wiki.test > 1.1 * chat.perplexity.wiki.test", True),    # 14 > 13.75
    ("chat_ft.perplexity.wiki.test > chat.perplexity.wiki.test * 1.2", False),   # 14 > 15
    ("chat_ft.old.wrong_rate >= chat.old.wrong_rate + 0.15", True),              # 0.3 >= 0.25
    ("chat_ft.old.accuracy < chat.old.accuracy - 0.05", True),                   # 0.7 < 0.75
    ("chat_ft.new.facts.accuracy != 1", False),                                  # group names with dots
    ("chat.adherence.rate < 0.9", False),
    ("chat_ft.old.n == 10", True),
    ("1e-3 > 0.01", False),
])
def test_arithmetic_comparisons_and_dotted_names(condition, failed):
    assert one(condition).failed is failed


@pytest.mark.parametrize("condition, message", [
    ("ghost.old.accuracy < 0.5", "'ghost.old.accuracy' names no model; models are chat, chat_ft, chat-ft.v2"),
    ("chat.recent.accuracy < 0.5", "chat has no probe group 'recent' (known: old)"),
    ("chat.old.precision < 0.5", "the metric 'precision' is not one of accuracy, wrong_rate, n"),
    ("chat.perplexity.c4 > 10", "chat.perplexity has no held-out dataset 'c4' (known: wiki.test)"),
    ("chat_ft.adherence.rate < 1", "chat_ft answered no chat probe, so it has no adherence figures"),
    ("chat.adherence.speed < 1", "chat.adherence has no adherence figure 'speed' (known: rate, "),
    ("chat.old.accuracy", "expected one comparison"),
    ("chat.old.accuracy < 0.5 < 0.7", "expected one comparison"),
    ("chat.old.accuracy < 0.5 *", "empty factor"),
])
def test_unknown_names_and_bad_syntax_are_clear_errors(condition, message):
    with pytest.raises(InfuseError) as caught:
        check_gates([condition], REPORT)
    assert message in str(caught.value)
    assert condition in str(caught.value)


def test_parse_never_evaluates_python():
    with pytest.raises(InfuseError, match="names no model"):
        check_gates(["__import__('os').system('true') < 1"], REPORT)
    gate = parse_gate("a.b.c <= 2 * d.e.f")
    assert (gate.op, gate.left, gate.right) == ("<=", [(1, ["a.b.c"])], [(1, ["2", "d.e.f"])])
