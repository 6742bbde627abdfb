"""A run killed with SIGKILL and started again ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from infuse.cli import main
from infuse.resume import SEAL_FILE

# Runs the same config as `infuse train`, plus a callback that SIGKILLs the process right after
# the Trainer wrote checkpoint-KILL_STEP and before infuse sealed it: a half-written checkpoint.
KILLED_RUN = """
import os, signal, sys
from transformers import TrainerCallback
from infuse.config import load_config
from infuse.train import run

class KillWhileSaving(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)

run(load_config(sys.argv[1]), callbacks=[KillWhileSaving()])
"""
KILL_STEP = 12


@pytest.fixture
def recipe(tmp_path, tiny_llama_config_path, tokenizer_dir, shared_data):
    def write(output_dir: Path, **changes) -> Path:
        values = {
            "model_config": str(tiny_llama_config_path), "tokenizer_name_or_path": str(tokenizer_dir),
            "dataset": [str(shared_data / "wiki_demo.txt")], "finetuning_type": "full", "block_size": 64,
            "output_dir": str(output_dir), "max_steps": 16, "per_device_train_batch_size": 4,
            "learning_rate": 3e-3, "logging_steps": 1, "save_steps": 4, "save_total_limit": 10,
            "cache_dir": str(tmp_path / "cache"), "report_to": "none", "seed": 7,
        }
        values.update(changes)
        path = output_dir.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(values))
        return path

    return write


def losses(output_dir: Path) -> list[float]:
    manifest = json.loads((output_dir / "infuse_run.json").read_text())
    return [entry["loss"] for entry in manifest["log_history"] if "loss" in entry]


@pytest.mark.parametrize("swa_start", [None, 0.25], ids=["last-weights", "averaged-weights"])
def test_killed_run_resumes_to_the_same_weights_and_losses(recipe, tmp_path, swa_start, capsys):
    straight = tmp_path / "straight"
    main(["train", str(recipe(straight, swa_start=swa_start))])

    resumed = tmp_path / "resumed"
    config = recipe(resumed, swa_start=swa_start)  # averaging from step 5: checkpoint 8 holds an average
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(config), str(KILL_STEP)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (resumed / f"checkpoint-{KILL_STEP}").is_dir()
    assert not (resumed / f"checkpoint-{KILL_STEP}" / SEAL_FILE).exists()

    capsys.readouterr()
    main(["train", str(config)])  # the same command again
    manifest = json.loads((resumed / "infuse_run.json").read_text())
    assert manifest["resumed_from"] == str(resumed / f"checkpoint-{KILL_STEP - 4}")
    assert f"since checkpoint-{KILL_STEP - 4})" in " ".join(capsys.readouterr().out.split())  # its steps' loss

    expected, got = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == got.keys()
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6
    assert losses(resumed) == pytest.approx(losses(straight), abs=1e-6)
    assert len(losses(resumed)) == 16


def test_a_finished_run_started_again_trains_no_more(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    config = recipe(out, max_steps=8)  # ends in the middle of an epoch
    main(["train", str(config)])
    manifest, weights = (out / "infuse_run.json").read_text(), load_file(out / "model.safetensors")
    capsys.readouterr()

    main(["train", str(config)])  # the same command again
    assert "nothing to do" in " ".join(capsys.readouterr().out.split())
    assert (out / "infuse_run.json").read_text() == manifest

    (out / "infuse_run.json").unlink()  # as if the process died after its last checkpoint
    main(["train", str(config)])
    printed = " ".join(capsys.readouterr().out.split())
    assert "nothing is left to train" in printed and "train_loss" not in printed  # no bar, no loss of 0
    finished = json.loads((out / "infuse_run.json").read_text())
    assert finished["resumed_from"] == str(out / "checkpoint-8") and not (out / "checkpoint-9").exists()
    assert max(entry["step"] for entry in finished["log_history"]) == 8
    assert "train_loss" not in finished["metrics"]  # no step was trained to give one
    assert all(torch.equal(tensor, load_file(out / "model.safetensors")[name]) for name, tensor in weights.items())


def test_a_finished_run_that_kept_no_checkpoint_is_neither_trained_again_nor_replaced(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    config = recipe(out, max_steps=4, save_strategy="no")
    main(["train", str(config)])
    manifest = (out / "infuse_run.json").read_text()
    capsys.readouterr()
    main(["train", str(config)])
    assert "nothing to do" in " ".join(capsys.readouterr().out.split())
    assert (out / "infuse_run.json").read_text() == manifest
    with pytest.raises(SystemExit):  # another run would replace its model
        main(["train", str(config), "--learning_rate", "1e-3"])
    assert "holds a finished run with other settings or data (learning_rate: 0.003 -> 0.001)" in " ".join(
        capsys.readouterr().err.split())
    main(["train", str(config), "--overwrite_output_dir", "true"])  # the way to train it again
    assert "nothing to do" not in capsys.readouterr().out and (out / "infuse_run.json").read_text() != manifest


def test_a_run_made_longer_trains_on_from_its_last_checkpoint(recipe, tmp_path, capsys):
    straight = tmp_path / "straight"
    main(["train", str(recipe(straight, max_steps=8, lr_scheduler_type="constant"))])
    longer = tmp_path / "longer"
    main(["train", str(recipe(longer, max_steps=4, lr_scheduler_type="constant"))])
    capsys.readouterr()

    main(["train", str(recipe(longer, max_steps=8, lr_scheduler_type="constant"))])
    assert "The run is made longer (max_steps: 4 -> 8)." in " ".join(capsys.readouterr().out.split())
    manifest = json.loads((longer / "infuse_run.json").read_text())
    assert manifest["resumed_from"] == str(longer / "checkpoint-4") and manifest["lengthened"] == "max_steps: 4 -> 8"
    # At a constant learning rate, four steps and four more are the eight steps of one run.
    assert losses(longer) == pytest.approx(losses(straight), abs=1e-6)
    expected, got = load_file(straight / "model.safetensors"), load_file(longer / "model.safetensors")
    assert max((expected[k] - got[k]).abs().max().item() for k in expected) <= 1e-6

    with pytest.raises(SystemExit):  # shorter than its last checkpoint: that is a change
        main(["train", str(recipe(longer, max_steps=6, lr_scheduler_type="constant"))])
    assert "max_steps: 8 -> 6" in capsys.readouterr().err

    averaged = tmp_path / "averaged"  # its checkpoint holds the mean over the shorter run's last half
    main(["train", str(recipe(averaged, max_steps=4, swa_start=0.5))])
    with pytest.raises(SystemExit):
        main(["train", str(recipe(averaged, max_steps=8, swa_start=0.5))])
    assert "cannot be made longer (max_steps: 4 -> 8)" in " ".join(capsys.readouterr().err.split())


def test_only_more_steps_or_epochs_make_a_run_longer():
    from infuse.resume import longer_run

    assert longer_run({"max_steps": 8}, {"max_steps": 16}) == "max_steps: 8 -> 16"
    assert longer_run({"num_train_epochs": 1}, {"num_train_epochs": 3}) == "num_train_epochs: 1 -> 3"
    assert longer_run({}, {"num_train_epochs": 5}) == "num_train_epochs: 3 -> 5"  # TrainingArguments' default: 3
    assert longer_run({"max_steps": 16}, {"max_steps": 8}) == ""
    assert longer_run({"num_train_epochs": 3}, {"max_steps": 100}) == ""  # steps against epochs: unknown
    assert longer_run({"max_steps": 8, "num_train_epochs": 1}, {"max_steps": 16, "num_train_epochs": 2}) == ""


def test_changed_settings_stop_the_resume_unless_overwriting(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", str(recipe(out, max_steps=4))])
    with pytest.raises(SystemExit) as info:
        main(["train", str(recipe(out, max_steps=4, learning_rate=1e-3))])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "learning_rate: 0.003 -> 0.001" in " ".join(err.split())
    assert "--overwrite_output_dir" in err

    main(["train", str(recipe(out, max_steps=4, learning_rate=1e-3)), "--overwrite_output_dir"])
    assert json.loads((out / "infuse_run.json").read_text())["resumed_from"] is None


def test_changed_data_stops_the_resume(recipe, tmp_path, shared_data, capsys):
    data = tmp_path / "docs.txt"
    data.write_text((shared_data / "wiki_demo.txt").read_text().splitlines()[0] + "\n")
    out = tmp_path / "run"
    main(["train", str(recipe(out, max_steps=2, save_steps=2, dataset=[str(data)]))])
    data.write_text(data.read_text() + "One more line of new text.\n")
    with pytest.raises(SystemExit):
        main(["train", str(recipe(out, max_steps=2, save_steps=2, dataset=[str(data)]))])
    assert "training data changed" in capsys.readouterr().err


def test_evaluation_files_join_a_run_unless_they_pick_the_saved_weights(recipe, tmp_path, shared_data, capsys):
    general = tmp_path / "general.txt"
    general.write_text("\n".join((shared_data / "wiki_demo.txt").read_text().splitlines()[-2:]) + "\n")
    out = tmp_path / "run"
    main(["train", str(recipe(out, max_steps=8))])
    main(["train", str(recipe(out, max_steps=8, eval_dataset=[str(general)]))])  # the same run, now evaluated
    manifest = json.loads((out / "infuse_run.json").read_text())
    assert manifest["resumed_from"] == str(out / "checkpoint-8") and manifest["metrics"]["eval_loss"] > 0
    assert not (out / "checkpoint-9").exists()  # evaluated, not trained further

    picked = tmp_path / "picked"  # the best evaluated checkpoint is saved: the eval files decide the result
    main(["train", str(recipe(picked, max_steps=8, eval_dataset=[str(general)], load_best_model_at_end=True))])
    general.write_text(general.read_text() + "One more line of other text.\n")
    with pytest.raises(SystemExit):
        main(["train", str(recipe(picked, max_steps=8, eval_dataset=[str(general)], load_best_model_at_end=True))])
    assert "evaluation data changed" in capsys.readouterr().err


def test_a_key_only_one_infuse_version_knows_is_a_change_only_off_its_default():
    from infuse.resume import describe_changes, run_fingerprint

    older = run_fingerprint({"learning_rate": 1e-3, "lr_scheduler_type": "cosine"}, "data")
    newer = {"learning_rate": 1e-3, "lr_scheduler_type": "cosine", "val_size": 0.0, "use_dora": False,
             "eval_dataset": [], "eval_steps": 5}  # new keys at their defaults; how often to evaluate is neutral
    assert describe_changes(older, run_fingerprint(newer, "data")) == []
    assert describe_changes(run_fingerprint(newer, "data"), older) == []
    held_out = run_fingerprint({**newer, "val_size": 0.2}, "data")
    assert describe_changes(older, held_out) == ["val_size: '<unset>' -> 0.2"]
    unset_training_key = {k: v for k, v in newer.items() if k != "lr_scheduler_type"}
    assert describe_changes(older, run_fingerprint(unset_training_key, "data")) == [
        "lr_scheduler_type: 'cosine' -> '<unset>'"]


def test_another_number_of_processes_is_a_change():
    from infuse.config import config_from_dict
    from infuse.resume import describe_changes, resume_fingerprint, run_fingerprint

    config = config_from_dict({"model_config": "tiny.json", "dataset": "docs.jsonl", "output_dir": "out"})
    one, two = (resume_fingerprint(config, "data", "", processes) for processes in (1, 2))
    assert describe_changes(two, one) == ["processes: 2 -> 1, each taking per_device_train_batch_size samples a step"]
    older_seal = run_fingerprint({k: v for k, v in config.to_dict().items() if k != "eval_dataset"}, "data")
    assert describe_changes(older_seal, one) == []  # sealed by an infuse without the key: one process
