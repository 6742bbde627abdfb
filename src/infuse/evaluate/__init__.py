"""Evaluate and compare models: probes (knowledge gained, stale facts, chat behaviour), perplexity
on held-out text (knowledge kept), chat-format adherence, lm-eval tasks, a report and CI gates.

Programmatic use::

    from infuse.evaluate import EvalSettings, evaluate
    report = evaluate({"base": "out/base", "infused": "out/base+out/run"}, "probes.jsonl", output="out/eval")
"""

from infuse.evaluate.gates import check_gates
from infuse.evaluate.generate import GenerationSettings
from infuse.evaluate.make_probes import make_probes, write_probes
from infuse.evaluate.probes import Probe, load_probes
from infuse.evaluate.report import write_report
from infuse.evaluate.runner import EvalSettings, evaluate

__all__ = ["EvalSettings", "GenerationSettings", "Probe", "check_gates", "evaluate", "load_probes",
           "make_probes", "write_probes", "write_report"]
