import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from infuse.config import config_from_dict, load_config, parse_overrides
from infuse.errors import InfuseError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MINIMAL = {"model_config": "tiny.json", "dataset": "docs.jsonl", "output_dir": "out/x"}


def test_overrides_are_typed_like_yaml():
    values = parse_overrides(["--learning_rate", "1.0e-4", "--bf16", "--lora_target=[q_proj, v_proj]",
                              "--num-train-epochs", "2", "--run_name", "a b"])
    assert values == {"learning_rate": 1e-4, "bf16": True, "lora_target": ["q_proj", "v_proj"],
                      "num_train_epochs": 2, "run_name": "a b"}


def test_yaml_plus_overrides_split_into_own_and_training_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "finetuning_type": "qlora", "learning_rate": "2e-4"}))
    config = load_config(path, ["--lora_rank", "4", "--per_device_train_batch_size", "2"])
    assert config.finetuning_type == "qlora" and config.lora_rank == 4
    assert config.dataset == ["docs.jsonl"]
    # YAML reads 2e-4 as a string; the TrainingArguments field wants a float.
    assert config.training["learning_rate"] == pytest.approx(2e-4)
    args = config.training_arguments()
    assert args.per_device_train_batch_size == 2 and args.output_dir == "out/x"
    assert "tensorboard" in args.report_to


def test_renamed_training_keys_still_work():
    config = config_from_dict({**MINIMAL, "warmup_ratio": 0.03, "group_by_length": True,
                               "gradient_checkpointing": True})
    args = config.training_arguments()
    assert args.warmup_steps == pytest.approx(0.03)
    assert args.train_sampling_strategy == "group_by_length"
    assert args.activation_checkpointing is True


def test_unknown_keys_suggest_close_matches_and_all_errors_are_reported():
    with pytest.raises(InfuseError) as info:
        config_from_dict({**MINIMAL, "lerning_rate": 1e-4, "lora_rnak": 4, "finetuning_type": "lorra"})
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "'lerning_rate'" in message and "'learning_rate'" in message
    assert "'lora_rank'" in message
    assert "finetuning_type: 'lorra' is not one of full, lora, qlora" in message


def test_model_source_must_be_exactly_one():
    with pytest.raises(InfuseError, match="exactly one of model_name_or_path"):
        config_from_dict({**MINIMAL, "model_name_or_path": "some/dir"})


def test_replay_refuses_persistent_workers_that_would_keep_the_first_epochs_blocks():
    replay = {**MINIMAL, "replay_dataset": "general.jsonl", "replay_ratio": 0.5, "dataloader_num_workers": 2}
    assert config_from_dict(replay).replay_ratio == 0.5
    with pytest.raises(InfuseError, match="dataloader_persistent_workers: cannot be used with replay_dataset"):
        config_from_dict({**replay, "dataloader_persistent_workers": True})


def test_values_of_the_wrong_type_are_named_before_anything_uses_them():
    with pytest.raises(InfuseError) as info:
        config_from_dict({**MINIMAL, "learning_rate": "1e-3x", "num_train_epochs": "two", "bf16": "yes",
                          "placeholders": "name=Infy", "replay_ratio": "most"})
    message = str(info.value)
    assert "5 problem(s)" in message
    assert "learning_rate: expected a number, got '1e-3x'" in message
    assert "num_train_epochs: expected a number, got 'two'" in message
    assert "bf16: expected true or false, got 'yes'" in message
    assert "placeholders: expected a mapping of names to values ({name: value}), got 'name=Infy'" in message
    assert "replay_ratio: expected a number, got 'most'" in message
    assert config_from_dict({**MINIMAL, "learning_rate": "2e-4", "max_steps": 3}).training["learning_rate"] == 2e-4
    with pytest.raises(InfuseError, match="per_device_train_batch_size: expected a positive integer, got 0"):
        config_from_dict({**MINIMAL, "per_device_train_batch_size": 0})
    with pytest.raises(InfuseError, match="learning_rate: expected 0 or more, got -1"):
        config_from_dict({**MINIMAL, "learning_rate": -1})
    with pytest.raises(InfuseError, match="max_steps: expected a positive number of steps, or -1"):
        config_from_dict({**MINIMAL, "max_steps": -5})


def test_a_comma_separated_list_of_files_is_a_list(tmp_path):
    assert config_from_dict({**MINIMAL, "dataset": "a.jsonl, b/"}).dataset == ["a.jsonl", "b/"]
    named = tmp_path / "x,y.jsonl"
    named.write_text("")
    assert config_from_dict({**MINIMAL, "dataset": str(named)}).dataset == [str(named)]


def test_swa_start_is_a_share_of_the_run():
    assert config_from_dict({**MINIMAL, "swa_start": 0.75}).swa_start == 0.75
    for bad in (1, 1.5, -0.1, "half"):
        with pytest.raises(InfuseError, match=r"swa_start: expected a share of the run's steps in \[0, 1\)"):
            config_from_dict({**MINIMAL, "swa_start": bad})


def test_sentence_shuffles_are_a_number_of_copies():
    assert config_from_dict({**MINIMAL, "replay_sentence_shuffles": 3}).replay_sentence_shuffles == 3
    for name in ("sentence_shuffles", "replay_sentence_shuffles"):
        for bad in (-1, 1.5, True):
            with pytest.raises(InfuseError, match=f"{name}: expected a number of copies"):
                config_from_dict({**MINIMAL, name: bad})


def test_evaluation_data_sets_evaluation_with_every_checkpoint_unless_told_otherwise():
    held = config_from_dict({**MINIMAL, "val_size": 0.1, "save_steps": 50})
    assert held.evaluates and held.training["eval_strategy"] == "steps" and held.training["eval_steps"] == 50
    by_epoch = config_from_dict({**MINIMAL, "eval_dataset": "general.jsonl", "save_strategy": "epoch"})
    assert by_epoch.eval_dataset == ["general.jsonl"] and by_epoch.training["eval_strategy"] == "epoch"
    told = config_from_dict({**MINIMAL, "val_size": 20, "evaluation_strategy": "no"})  # the 4.x name
    assert told.training["eval_strategy"] == "no"
    assert not config_from_dict(MINIMAL).evaluates and "eval_strategy" not in config_from_dict(MINIMAL).training
    stopping = config_from_dict({**MINIMAL, "val_size": 0.1, "early_stopping_patience": 3}).training_arguments()
    assert stopping.load_best_model_at_end and stopping.metric_for_best_model == "loss"


def test_evaluation_settings_that_cannot_work_are_refused():
    cases = {
        "val_size: expected a share in (0, 1) or a number of samples": {"val_size": 1.5},
        "val_size and eval_dataset are both set": {"val_size": 0.1, "eval_dataset": "general.jsonl"},
        "eval_strategy: 'steps' needs data to evaluate on": {"eval_strategy": "steps"},
        "val_size: held-out blocks would still be trained on": {"val_size": 0.1, "sentence_shuffles": 2},
        "early_stopping_patience: stopping on the eval loss needs data": {"early_stopping_patience": 3},
        "early_stopping_patience: expected a number of evaluations": {"val_size": 0.1, "early_stopping_patience": 0},
        "swa_start and the best checkpoint": {"val_size": 0.1, "early_stopping_patience": 3, "swa_start": 0.5},
    }
    for message, values in cases.items():
        with pytest.raises(InfuseError, match=message.replace("(", r"\(").replace(")", r"\)")):
            config_from_dict({**MINIMAL, **values})
    assert config_from_dict({**MINIMAL, "stage": "sft", "val_size": 0.1, "sentence_shuffles": 2}).val_size == 0.1


def test_switches_take_true_or_false_only():
    assert config_from_dict({**MINIMAL, "move_openers": True, "packing": False}).move_openers
    for bad in ("false", 0, None):
        with pytest.raises(InfuseError, match="move_openers: expected true or false"):
            config_from_dict({**MINIMAL, "move_openers": bad})


def test_more_processes_than_gpus_is_refused_before_nccl_fails(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node 2
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    values = {**MINIMAL, "output_dir": str(tmp_path / "out")}
    with pytest.raises(InfuseError, match="2 processes on this machine, but it has 1 GPU.*--nproc_per_node 1"):
        config_from_dict(values).training_arguments()
    assert config_from_dict({**values, "use_cpu": True}).training_arguments().use_cpu


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage: pt\nmodel_config: [unclosed\n")
    with pytest.raises(InfuseError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("recipe", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_parses(recipe):
    config = load_config(recipe)
    if config.training.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        config.training["deepspeed"] = None  # not installed here; every other key must still be valid
    config.training_arguments()
