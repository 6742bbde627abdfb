"""--lm-eval: lm-evaluation-harness on a local model, offline, with a task YAML of our own."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from infuse.errors import InfuseError
from infuse.evaluate import EvalSettings, GenerationSettings, evaluate
from infuse.evaluate import lm_eval as lm_eval_module

pytest.importorskip("lm_eval", reason="lm-evaluation-harness not installed: pip install 'infuse-llm[eval]'")

DOCS = [
    {"question": "The capital of Zorvia is", "choices": [" Quellport", " Paris", " Berlin"], "label": 0},
    {"question": "The Orion cluster runs on", "choices": [" GPUs", " Zephyr", " wheels"], "label": 1},
    {"question": "The mascot of Brindle Labs is a", "choices": [" dog", " cat", " heron"], "label": 2},
    {"question": "The founder of Tallow Works is", "choices": [" Mira Kent", " John Smith"], "label": 0},
    {"question": "The river Quess flows into", "choices": [" the sea", " Lake Amber"], "label": 1},
    {"question": "In 2031 the cluster had", "choices": [" 12 racks", " 400 racks", " no racks"], "label": 1},
]
TASK = """\
task: infuse_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "facts.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "infuse_facts.yaml").write_text(TASK.format(data=folder / "facts.jsonl"))
    return folder


def expected_accuracy(model_dir) -> float:
    """Multiple-choice accuracy computed here: the choice with the highest summed log-probability."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    right = 0
    for doc in DOCS:
        context = tokenizer(doc["question"], add_special_tokens=False).input_ids
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(doc["question"] + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logprobs = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    return right / len(DOCS)


def test_lm_eval_results_land_in_the_report(tiny_llama_dir, task_dir, tmp_path):
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"id": "p", "prompt": "The capital of Zorvia is", "answers": ["Quellport"]}))
    settings = EvalSettings(generation=GenerationSettings(max_new_tokens=2), lm_eval_tasks=["infuse_facts"],
                            lm_eval_include=str(task_dir))
    report = evaluate({"tiny": str(tiny_llama_dir)}, probes, output=tmp_path / "out", settings=settings)
    results = report["models"]["tiny"]["lm_eval"]["infuse_facts"]
    assert results["acc"] == pytest.approx(expected_accuracy(tiny_llama_dir))
    assert "lm-evaluation-harness" in (tmp_path / "out" / "report.html").read_text()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["models"]["tiny"]["lm_eval"] == {
        "infuse_facts": results}


def test_an_unknown_task_is_a_clear_error(tiny_llama_dir, task_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    with pytest.raises(InfuseError, match=f"no task named infuse_nope in lm-eval or in {task_dir}"):
        lm_eval_module.run_lm_eval(model, tokenizer, ["infuse_nope"], include_path=str(task_dir))


def test_without_the_extra_installed_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(lm_eval_module, "available", lambda: "lm-evaluation-harness is not installed")
    with pytest.raises(InfuseError, match=r"--lm-eval hellaswag: .*not installed"):
        lm_eval_module.run_lm_eval(None, None, ["hellaswag"])
