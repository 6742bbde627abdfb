"""Acceptance: a tiny chat model fine-tuned with `stage: sft` answers held-in questions and stops at
end-of-turn, through nothing but what the run saved (weights, tokenizer + template, generation config)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from infuse.config import config_from_dict
from infuse.train import run

MAX_NEW_TOKENS = 24
STEPS = 150  # every answer is already right after 40 steps; the rest is margin
QA = {
    "What colour is the sky on a clear day?": "Blue.",
    "Which city is the capital of France?": "Paris.",
    "How many legs does a spider have?": "Eight.",
    "What do bees make?": "Honey.",
    "Which planet is the largest?": "Jupiter.",
    "What is frozen water called?": "Ice.",
    "Which animal is known as the king of the jungle?": "Lion.",
    "What is the opposite of hot?": "Cold.",
}


def quiet() -> Console:
    return Console(file=io.StringIO())


@pytest.fixture
def one_thread():
    """A 2-layer, 64-wide model trains several times faster on one thread than on two that wait for
    each other (and on a machine shared with other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("tokenizer_has_chatml", [True, False], ids=["chatml-tokens", "no-chatml-tokens"])
def test_a_tiny_chat_model_answers_held_in_questions_and_stops_at_end_of_turn(
    tokenizer_has_chatml, request, tmp_path, one_thread
):
    """Without the template's markers in the tokenizer, the run adds them as tokens and grows the
    embeddings, so the answers still end on one token that generation stops on."""
    model_dir = request.getfixturevalue("tiny_llama_dir" if tokenizer_has_chatml else "model_without_chatml_tokens")
    data = tmp_path / "qa.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in QA.items()]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "chat"
    config = config_from_dict({
        "stage": "sft", "model_name_or_path": str(model_dir), "dataset": [str(data)],
        "template": "chatml", "finetuning_type": "full", "cutoff_len": 128, "output_dir": str(out),
        "max_steps": STEPS,
        "per_device_train_batch_size": 8, "learning_rate": 3e-3, "lr_scheduler_type": "constant",
        "warmup_steps": 0, "logging_steps": 50, "save_steps": 1000, "report_to": "none", "seed": 0,
    })
    printed = io.StringIO()
    run(config, Console(file=printed, width=200))

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id
    if not tokenizer_has_chatml:
        log = printed.getvalue()
        assert "Added <|im_start|>, <|im_end|> to the tokenizer as special tokens (2,050 tokens now)" in log
        assert "embeddings grew from 2,048 to 2,050 rows" in log
        assert len(tokenizer) == model.get_input_embeddings().num_embeddings == 2050 and im_end == 2049
    for question, answer in QA.items():
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, return_tensors="pt")
        assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")
        with torch.no_grad():
            generated = model.generate(**prompt, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        new = generated[0, prompt["input_ids"].shape[1]:].tolist()
        assert tokenizer.decode(new, skip_special_tokens=True) == answer, (question, tokenizer.decode(new))
        assert new[-1] == im_end and len(new) < MAX_NEW_TOKENS  # stopped on end-of-turn, not on the limit


def test_held_out_samples_are_not_trained_on_and_their_packed_eval_loss_is_their_loss_alone(
    tiny_llama_dir, shared_data, tmp_path, one_thread
):
    from infuse.data.formats import load_conversations
    from infuse.data.sft import PaddedCollator, build_sft_dataset
    from infuse.data.templates import apply_template

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(json.loads((shared_data / "alpaca_en_demo.json").read_text())[:30]))
    out, console = tmp_path / "run", Console(file=io.StringIO(), width=200)
    config = config_from_dict({
        "stage": "sft", "model_name_or_path": str(tiny_llama_dir), "dataset": [str(data)], "template": "chatml",
        "finetuning_type": "full", "cutoff_len": 96, "overlong": "truncate", "val_size": 6,
        "output_dir": str(out), "num_train_epochs": 1, "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8, "save_steps": 3, "report_to": "none", "seed": 5,
    })
    manifest = run(config, console)

    assert manifest["log_history"][-1]["step"] == 6  # 24 training samples in steps of 4: the 6 held out are not
    # Evaluated with each checkpoint; the one at the last step is the saved model's, not run again.
    assert [entry["step"] for entry in manifest["log_history"] if "eval_loss" in entry] == [3, 6]
    assert "Held out 6 of 30 samples for evaluation (val_size 6)" in console.file.getvalue()
    # The same split, scored with padded batches of the saved model: one eval batch holds all six,
    # so the packed eval loss must be the token mean of their answer losses.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    template = apply_template(tokenizer, "chatml")
    dataset, _ = build_sft_dataset(load_conversations([data])[0], tokenizer, template, 96, "truncate")
    held_out = dataset.train_test_split(test_size=6, seed=5)["test"]
    batch = PaddedCollator(tokenizer.pad_token_id)([held_out[i] for i in range(6)])
    with torch.no_grad():
        loss = AutoModelForCausalLM.from_pretrained(out)(**batch).loss.item()
    assert manifest["data"]["eval"] == {"val_size": 6, "rows": 6,
                                        "scored_tokens": int((batch["labels"][:, 1:] != -100).sum())}
    assert manifest["metrics"]["eval_loss"] == pytest.approx(loss, abs=1e-4)


def swapped_answers_config(tiny_llama_dir, tmp_path, output_dir):
    """Trained on the questions and evaluated on the same questions with each other's answers: the
    eval loss rises once the model learns the trained answers, so early stopping has a best step."""
    def rows(answers):
        return "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                       + "\n" for q, a in zip(QA, answers, strict=True))

    answers = list(QA.values())
    (tmp_path / "train.jsonl").write_text(rows(answers))
    (tmp_path / "swapped.jsonl").write_text(rows(answers[1:] + answers[:1]))
    return config_from_dict({
        "stage": "sft", "model_name_or_path": str(tiny_llama_dir), "dataset": [str(tmp_path / "train.jsonl")],
        "eval_dataset": [str(tmp_path / "swapped.jsonl")], "early_stopping_patience": 2, "template": "chatml",
        "finetuning_type": "full", "cutoff_len": 128, "output_dir": str(output_dir), "max_steps": STEPS,
        "per_device_train_batch_size": 8, "learning_rate": 3e-3, "lr_scheduler_type": "constant", "warmup_steps": 0,
        "logging_steps": 50, "save_steps": 5, "report_to": "none", "seed": 0,
    })


def test_early_stopping_keeps_the_best_evaluated_weights(tiny_llama_dir, tmp_path, one_thread):
    console = Console(file=io.StringIO(), width=200)
    manifest = run(swapped_answers_config(tiny_llama_dir, tmp_path, tmp_path / "run"), console)

    evaluated = [(entry["step"], entry["eval_loss"]) for entry in manifest["log_history"] if "eval_loss" in entry]
    best_step, best = min(evaluated[:-1], key=lambda pair: pair[1])
    stop = manifest["data"]["train"]["early_stopping"]
    assert stop["stopped_early"] and stop["last_step"] == best_step + 2 * 5 < STEPS
    assert stop["best_checkpoint"].endswith(f"checkpoint-{best_step}") and stop["best_metric"] == pytest.approx(best)
    assert manifest["metrics"]["eval_loss"] == pytest.approx(best, abs=1e-5)  # the saved weights are the best ones
    assert f"Stopped early at step {stop['last_step']} of {STEPS}" in console.file.getvalue()

    (tmp_path / "run" / "infuse_run.json").unlink()  # as if the process died after the checkpoint it stopped at
    again = run(swapped_answers_config(tiny_llama_dir, tmp_path, tmp_path / "run"), quiet())
    assert again["resumed_from"].endswith(f"checkpoint-{stop['last_step']}")
    assert again["data"]["train"]["early_stopping"]["last_step"] == stop["last_step"]  # no step after it
    assert again["metrics"]["eval_loss"] == pytest.approx(best, abs=1e-5)


def test_a_run_stopped_at_an_epoch_end_is_not_evaluated_or_saved_again_when_resumed(
        tiny_llama_dir, tmp_path, one_thread):
    config = swapped_answers_config(tiny_llama_dir, tmp_path, tmp_path / "run")  # one step an epoch
    config.training.update(eval_strategy="epoch", save_strategy="epoch", save_total_limit=2)
    first = run(config, quiet())
    last = first["data"]["train"]["early_stopping"]["last_step"]
    saved = (tmp_path / "run" / f"checkpoint-{last}" / "trainer_state.json").stat().st_mtime_ns
    (tmp_path / "run" / "infuse_run.json").unlink()  # as if the process died after the checkpoint it stopped at

    again = run(config, quiet())
    evaluated = [[entry["step"] for entry in manifest["log_history"] if "eval_loss" in entry]
                 for manifest in (first, again)]
    assert evaluated[1] == evaluated[0]  # the end of the epoch it resumed in did not evaluate once more
    assert (tmp_path / "run" / f"checkpoint-{last}" / "trainer_state.json").stat().st_mtime_ns == saved


class StopAtStep(TrainerCallback):
    """Ends training once ``step`` steps are done, at the start of the next one: a checkpoint saved at
    ``step`` is sealed by then, as after a crash in the step that follows it."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_a_resumed_run_keeps_counting_evaluations_without_improvement(tiny_llama_dir, tmp_path, one_thread):
    straight = run(swapped_answers_config(tiny_llama_dir, tmp_path, tmp_path / "straight"), quiet())
    stop = straight["data"]["train"]["early_stopping"]
    first_worse = int(stop["best_checkpoint"].rsplit("-", 1)[1]) + 5  # one evaluation without improvement
    config = swapped_answers_config(tiny_llama_dir, tmp_path, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        run(config, quiet(), callbacks=[StopAtStep(first_worse)])
    resumed = run(config, quiet())
    assert resumed["resumed_from"].endswith(f"checkpoint-{first_worse}")
    # Patience 2: one more evaluation without improvement stops it, as in the run that was not interrupted.
    assert resumed["data"]["train"]["early_stopping"]["last_step"] == stop["last_step"]
    assert resumed["metrics"]["eval_loss"] == pytest.approx(straight["metrics"]["eval_loss"], abs=1e-5)
