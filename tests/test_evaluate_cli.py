"""`infuse eval` end to end on two tiny models, one trained on a handful of facts and one not;
the same models behind an HTTP server give the same numbers; gates exit 3 or 0."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from conftest import random_lora_adapter
from rich.console import Console

from infuse.cli import main
from infuse.config import config_from_dict
from infuse.evaluate import EvalSettings, GenerationSettings, evaluate
from infuse.evaluate.report import load_schema

FACTS = ["The capital of Zorvia is Quellport.", "The Orion cluster runs on Zephyr chips.",
         "The mascot of Brindle Labs is a heron.", "The river Quess flows into Lake Amber.",
         "The founder of Tallow Works is Mira Kent."]
PROBES = [
    {"id": "zorvia", "group": "new", "mode": "completion", "prompt": "The capital of Zorvia is",
     "answers": ["Quellport"]},
    {"id": "orion", "group": "new", "mode": "completion", "prompt": "The Orion cluster runs on",
     "answers": ["Zephyr"]},
    {"id": "quess", "group": "new", "mode": "completion", "prompt": "The river Quess flows into",
     "answers": ["Lake Amber"]},
    {"id": "tallow", "group": "new", "mode": "completion", "prompt": "The founder of Tallow Works is",
     "answers": ["Mira Kent"]},
    # The news says the mascot changed: "heron" is now the stale, wrong answer.
    {"id": "mascot", "group": "updated", "mode": "completion", "prompt": "The mascot of Brindle Labs is a",
     "answers": ["crane"], "wrong": ["heron"]},
    {"id": "hello", "group": "general", "mode": "chat", "prompt": "Where does the river Quess flow?",
     "answers": ["Lake Amber"]},
    {"id": "orion-chat", "group": "general", "mode": "chat", "prompt": "What does Orion run on?",
     "answers": ["Zephyr"]},
]
FAST = GenerationSettings(max_new_tokens=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """The untrained tiny Llama, and a copy trained (full, pt, 40 steps) until it recites FACTS."""
    from infuse.train import run

    out = tmp_path_factory.mktemp("facts")
    (out / "facts.jsonl").write_text("".join(json.dumps({"text": f}) + "\n" for f in FACTS * 8))
    run(config_from_dict({
        "model_name_or_path": str(tiny_llama_dir), "dataset": [str(out / "facts.jsonl")],
        "finetuning_type": "full", "block_size": 64, "output_dir": str(out / "trained"), "max_steps": 40,
        "per_device_train_batch_size": 8, "learning_rate": 5e-3, "warmup_steps": 0,
        "lr_scheduler_type": "constant", "logging_steps": 10, "save_strategy": "no", "report_to": "none",
        "cache_dir": str(out / "cache"), "seed": 0,
    }))
    (out / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBES))
    heldout = {"text": "The weather was mild and the market was busy."}
    (out / "heldout.jsonl").write_text(json.dumps(heldout) + "\n")
    return {"base": Path(tiny_llama_dir), "trained": out / "trained", "probes": out / "probes.jsonl",
            "heldout": out / "heldout.jsonl"}


@pytest.fixture(scope="module")
def local_report(models, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("eval")
    main(["eval", "--model", f"base={models['base']}", "--model", f"trained={models['trained']}",
          "--probes", str(models["probes"]), "--output", str(output), "--max-new-tokens", "8",
          "--heldout", str(models["heldout"]), "--runs", str(models["trained"]),
          "--fail-if", "trained.new.accuracy < base.new.accuracy + 0.5"])  # holds not: no exit
    return json.loads((output / "report.json").read_text())


def test_the_trained_model_scores_higher_and_the_report_says_so(local_report):
    jsonschema.validate(local_report, load_schema())
    base, trained = local_report["models"]["base"], local_report["models"]["trained"]
    assert trained["groups"]["new"]["accuracy"] == 1.0
    assert base["groups"]["new"]["accuracy"] == 0.0
    assert local_report["findings"][0] == ("new: trained 100.0% (4/4), base 0.0% (0/4). trained scores "
                                           "highest, 100.0 percentage points above base.")
    # It recites the stale fact: a known-wrong answer, counted.
    assert trained["groups"]["updated"] == {**trained["groups"]["updated"], "n": 1, "wrong_hits": 1,
                                            "wrong_rate": 1.0, "accuracy": 0.0}
    assert base["groups"]["updated"]["wrong_hits"] == 0
    assert "Known-wrong answers given: trained 1/1." in local_report["findings"][1]
    outputs = {p["id"]: p["outputs"] for p in local_report["probes"]}
    assert "Quellport" in outputs["zorvia"]["trained"]["text"] and outputs["zorvia"]["trained"]["correct"]
    assert local_report["gates"][0]["failed"] is False


def test_perplexity_loss_curves_and_chat_format_are_reported(local_report, models):
    base, trained = local_report["models"]["base"], local_report["models"]["trained"]
    # The untrained model is near uniform over the vocabulary; the trained one is sure of other things.
    vocab = json.loads((models["base"] / "config.json").read_text())["vocab_size"]
    assert 0.5 * vocab < base["perplexity"]["heldout"] < 2 * vocab
    assert trained["perplexity"]["heldout"] != base["perplexity"]["heldout"]
    assert local_report["heldout"]["heldout"]["documents"] == 1
    losses = [loss for _, loss in local_report["runs"]["trained"]["loss"]]
    assert len(losses) == 4 and losses[-1] < 0.1 * losses[0]
    for model in (base, trained):
        chat = [p["outputs"][name] for p in local_report["probes"] if p["mode"] == "chat"
                for name in local_report["models"] if local_report["models"][name] is model]
        kept = sum(1 for out in chat if out["stopped"] and not out["leaked"])
        assert model["adherence"]["n"] == 2 and model["adherence"]["rate"] == kept / 2
    assert base["adherence"]["ended_at_turn_end"] == 0.0  # random weights never say <|im_end|> in 8 tokens


def test_a_failing_gate_exits_3_and_prints_the_condition(models, tmp_path, capsys):
    condition = "trained.updated.wrong_rate > 0.5 * base.new.accuracy"
    with pytest.raises(SystemExit) as caught:
        main(["eval", "--model", f"base={models['base']}", "--model", f"trained={models['trained']}",
              "--probes", str(models["probes"]), "--output", str(tmp_path), "--max-new-tokens", "8",
              "--fail-if", "trained.new.accuracy < 0.5", "--fail-if", condition])
    assert caught.value.code == 3
    err = " ".join(capsys.readouterr().err.split())
    assert f"gate failed: {condition} [1 vs 0; trained.updated.wrong_rate = 1, base.new.accuracy = 0]" in err
    assert "trained.new.accuracy < 0.5" not in err  # that one holds: reported on stdout as ok
    gates = json.loads((tmp_path / "report.json").read_text())["gates"]
    assert [g["failed"] for g in gates] == [False, True]


def test_an_unknown_name_in_a_gate_stops_before_any_model_loads(models, tmp_path, capsys):
    started = time.time()
    with pytest.raises(SystemExit) as caught:
        main(["eval", "--model", f"base={models['base']}", "--probes", str(models["probes"]),
              "--output", str(tmp_path), "--fail-if", "base.recent.accuracy < 0.5"])
    assert caught.value.code == 2
    assert "base has no probe group 'recent' (known: new, updated, general)" in " ".join(
        capsys.readouterr().err.split())
    assert time.time() - started < 5 and not (tmp_path / "report.json").exists()


def test_only_limits_a_model_to_one_mode(models):
    report = evaluate({"base": str(models["base"])}, models["probes"], settings=EvalSettings(generation=FAST),
                      modes={"base": "chat"})
    assert set(report["models"]["base"]["groups"]) == {"general"}
    assert report["models"]["base"]["skipped"] == {"completion": "--only base=chat"}
    assert [p["outputs"] != {} for p in report["probes"]] == [p["mode"] == "chat" for p in PROBES]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's call
def test_an_adapter_on_another_base_than_it_records_is_named(models, tmp_path):
    adapter = random_lora_adapter(models["base"], tmp_path, seed=0, spread=0.1, r=2, target_modules=["q_proj"])
    out = io.StringIO()
    evaluate({"odd": f"{models['trained']}+{adapter}"}, models["probes"], settings=EvalSettings(generation=FAST),
             console=Console(file=out, width=300))
    expected = f"odd: the adapter was trained on {models['base']}, and is used here on {models['trained']}."
    assert expected in out.getvalue()


# ---------------------------------------------------------------- the same models behind a server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_server(paths: dict[str, Path]):
    """A stand-in for a model server written with plain transformers: OpenAI /v1 for every model and
    TGI /generate for the first, one request at a time, unbatched greedy decoding."""
    from fastapi import FastAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = {name: (AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
              for name, path in paths.items()}
    app = FastAPI()

    def complete(name: str, text: str, max_tokens: int, chat: bool, special: bool) -> tuple[str, bool, int]:
        model, tokenizer = loaded[name]
        ids = tokenizer(text, add_special_tokens=special, return_tensors="pt").input_ids
        stops = [tokenizer.eos_token_id] + ([tokenizer.convert_tokens_to_ids("<|im_end|>")] if chat else [])
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        end = next((i for i, t in enumerate(new) if t in stops), len(new))
        return tokenizer.decode(new[:end], skip_special_tokens=True), end < len(new), end

    @app.get("/v1/models")
    def listing() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model"} for name in loaded]}

    @app.post("/v1/completions")
    def completions(body: dict) -> dict:
        assert body["temperature"] == 0.0
        text, stopped, n = complete(body["model"], body["prompt"], body["max_tokens"], False, True)
        return {"choices": [{"text": text, "finish_reason": "stop" if stopped else "length"}],
                "usage": {"completion_tokens": n}}

    @app.post("/v1/chat/completions")
    def chat(body: dict) -> dict:
        tokenizer = loaded[body["model"]][1]
        prompt = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, tokenize=False)
        text, stopped, n = complete(body["model"], prompt, body["max_tokens"], True, False)
        choice = {"message": {"role": "assistant", "content": text},
                  "finish_reason": "stop" if stopped else "length"}
        return {"choices": [choice], "usage": {"completion_tokens": n}}

    @app.post("/generate")
    def generate(body: dict) -> dict:
        assert body["parameters"]["do_sample"] is False
        text, stopped, n = complete(next(iter(loaded)), body["inputs"], body["parameters"]["max_new_tokens"],
                                    False, True)
        return {"generated_text": text,
                "details": {"finish_reason": "eos_token" if stopped else "length", "generated_tokens": n}}

    return app


class Running:
    def __init__(self, app):
        import uvicorn

        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def scores(report: dict) -> dict:
    return {name: {"groups": {g: {k: m[k] for k in ("n", "accuracy", "wrong_rate", "wrong_hits")}
                              for g, m in model["groups"].items()},
                   "adherence": model["adherence"]}
            for name, model in report["models"].items()}


def texts(report: dict) -> dict:
    return {(p["id"], name): out["text"] for p in report["probes"] for name, out in p["outputs"].items()}


def test_served_models_give_the_same_numbers_as_local_ones(models, local_report):
    server = Running(fake_server({"base": models["base"], "trained": models["trained"]}))
    try:
        served = evaluate({"base": f"{server.url}#base", "trained": f"{server.url}/v1#trained"},
                          models["probes"], settings=EvalSettings(generation=FAST, batch_size=4))
        tgi = evaluate({"base": f"{server.url}/generate"}, models["probes"],
                       settings=EvalSettings(generation=FAST))
    finally:
        server.stop()
    assert {m["backend"] for m in served["models"].values()} == {"openai"}
    assert scores(served) == scores(local_report)
    assert texts(served) == texts(local_report)
    # TGI's /generate takes no chat: the chat probes are skipped, and said so.
    assert tgi["models"]["base"]["skipped"]["chat"].startswith("TGI's /generate takes raw text")
    local_base = {key: text for key, text in texts(local_report).items() if key in texts(tgi)}
    assert texts(tgi) == local_base and len(local_base) == 5


def test_an_endpoint_that_is_not_there_is_a_clear_error(models, tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["eval", "--model", f"gone=http://127.0.0.1:{free_port()}", "--probes", str(models["probes"]),
              "--output", str(tmp_path)])
    assert caught.value.code == 2
    assert "cannot reach" in " ".join(capsys.readouterr().err.split())


def test_infuse_serve_gives_the_same_numbers_as_local_evaluation(models, local_report):
    serve = pytest.importorskip("infuse.serve", reason="infuse.serve is not in this tree yet")
    handle = serve.start_server({"base": str(models["base"]), "trained": str(models["trained"])},
                                host="127.0.0.1", port=0)
    try:
        specs = {"base": f"{handle.url}#base", "trained": f"{handle.url}#trained"}
        served = evaluate(specs, models["probes"], settings=EvalSettings(generation=FAST))
    finally:
        handle.stop()
    assert {m["backend"] for m in served["models"].values()} == {"openai"}
    assert scores(served) == scores(local_report)
    assert texts(served) == texts(local_report)
