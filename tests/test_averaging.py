"""Stochastic weight averaging: the saved model is the mean of the weights over the last steps."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainerState

from infuse.averaging import AVERAGE_FILE, WeightAveraging
from infuse.config import config_from_dict
from infuse.errors import InfuseError
from infuse.train import run


class RecordWeights(TrainerCallback):
    """The model's weights after every optimizer step (extra callbacks run before infuse's own)."""

    def __init__(self):
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps[state.global_step] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def train(tmp_path, tiny_llama_config_path, tokenizer_dir, shared_data):
    def run_with(**changes) -> tuple[dict, RecordWeights]:
        recorder = RecordWeights()
        config = config_from_dict({
            "model_config": str(tiny_llama_config_path), "tokenizer_name_or_path": str(tokenizer_dir),
            "dataset": [str(shared_data / "wiki_demo.txt")], "finetuning_type": "full", "block_size": 64,
            "output_dir": str(tmp_path / "run"), "max_steps": 6, "per_device_train_batch_size": 4,
            "learning_rate": 3e-3, "lr_scheduler_type": "constant", "save_steps": 4, "report_to": "none",
            "cache_dir": str(tmp_path / "cache"), "seed": 7, "overwrite_output_dir": True, **changes,
        })
        return run(config, Console(file=io.StringIO()), callbacks=[recorder]), recorder

    return run_with


def test_the_saved_model_is_the_mean_of_the_weights_from_swa_start_on(train, tmp_path):
    manifest, recorder = train(swa_start=0.5)
    assert manifest["data"]["train"]["weight_averaging"] == {"swa_start": 0.5, "from_step": 4, "steps_averaged": 3}
    saved = load_file(tmp_path / "run" / "model.safetensors")
    for name, weight in saved.items():
        mean = torch.stack([recorder.steps[step][name] for step in range(4, 7)]).mean(0)
        assert (weight - mean).abs().max() <= 1e-6, name
    assert any((saved[k] - recorder.steps[6][k]).abs().max() > 1e-4 for k in saved)  # not the last step's
    checkpoint = torch.load(tmp_path / "run" / "checkpoint-4" / AVERAGE_FILE, weights_only=True)
    assert checkpoint["count"] == 1  # step 4, kept for a resumed run


def test_the_final_evaluation_scores_the_average_not_the_last_step(train):
    manifest, _ = train(swa_start=0.5, val_size=8, max_steps=8)
    evaluations = [entry for entry in manifest["log_history"] if "eval_loss" in entry]
    assert [entry["step"] for entry in evaluations] == [4, 8, 8]  # with the checkpoints, then the average
    assert manifest["metrics"]["eval_loss"] == evaluations[-1]["eval_loss"] != evaluations[-2]["eval_loss"]


def test_without_swa_start_the_last_steps_weights_are_saved(train, tmp_path):
    manifest, recorder = train()
    assert "weight_averaging" not in manifest["data"]["train"]
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert all((saved[k] - recorder.steps[6][k]).abs().max() == 0 for k in saved)
    assert not (tmp_path / "run" / "checkpoint-4" / AVERAGE_FILE).exists()
    assert json.loads((tmp_path / "run" / "infuse_run.json").read_text())["config"]["swa_start"] is None


def test_sharded_weights_are_refused_with_a_clear_error():
    model = torch.nn.Linear(4, 4)
    model.weight.data = torch.empty(0)  # what DeepSpeed ZeRO-3 leaves in place of a partitioned weight
    state = TrainerState(max_steps=10)
    with pytest.raises(InfuseError, match="swa_start: this run shards its weights"):
        WeightAveraging(0.5).on_train_begin(None, state, None, model=model)
