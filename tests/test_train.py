"""End-to-end training runs on a tiny Llama: pretraining, LoRA/QLoRA infusion, the seed recipe."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback

from infuse.cli import main
from infuse.config import config_from_dict
from infuse.train import run

REPO = Path(__file__).resolve().parents[1]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


def logged_losses(manifest: dict) -> list[float]:
    return [entry["loss"] for entry in manifest["log_history"] if "loss" in entry]


class KeepModel(TrainerCallback):
    """Holds on to the trained model so a test can compare it with what was saved."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


@torch.no_grad()
def corpus_loss(model, tokenizer, texts: list[str], block_size: int = 64) -> float:
    ids = torch.tensor(tokenizer("\n".join(texts)).input_ids[: block_size * 8]).view(-1, block_size)
    ids = ids.to(model.device)
    return model(input_ids=ids, labels=ids).loss.item()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, shared_data) -> Path:
    """Twenty c4 pages: the 'new knowledge' that LoRA and QLoRA runs infuse."""
    rows = (shared_data / "c4_demo.jsonl").read_text().splitlines()[:20]
    path = tmp_path_factory.mktemp("corpus") / "new.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, shared_data, tiny_llama_config_path, tokenizer_dir) -> dict:
    """A tiny Llama pretrained from its config on wiki_demo; the manifest and output dir."""
    out = tmp_path_factory.mktemp("pretrained")
    config = config_from_dict({
        "model_config": str(tiny_llama_config_path), "tokenizer_name_or_path": str(tokenizer_dir),
        "dataset": [str(shared_data / "wiki_demo.txt")], "finetuning_type": "full", "block_size": 128,
        "output_dir": str(out), "max_steps": 300, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
        "warmup_steps": 10, "logging_steps": 10, "logging_first_step": True, "save_steps": 1000,
        "cache_dir": str(out / "cache"), "report_to": "none",
    })
    return {"manifest": run(config, quiet()), "dir": out}


def test_pretraining_from_config_cuts_the_loss_by_30_percent(pretrained):
    losses = logged_losses(pretrained["manifest"])
    assert losses[-1] <= 0.7 * losses[0], losses
    out = pretrained["dir"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    manifest = json.loads((out / "infuse_run.json").read_text())
    assert manifest["data"]["train"]["tokens"] > 0 and manifest["libraries"]["transformers"]
    assert manifest["config"]["block_size"] == 128


@pytest.mark.parametrize("finetuning_type", ["lora", "qlora"])
def test_adapter_infusion_lowers_corpus_loss_and_reloads_with_plain_peft(
    finetuning_type, pretrained, small_corpus, tmp_path
):
    base_dir = str(pretrained["dir"])
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    texts = [json.loads(line)["text"] for line in small_corpus.read_text().splitlines()]
    before = corpus_loss(AutoModelForCausalLM.from_pretrained(base_dir), tokenizer, texts)

    keep = KeepModel()
    config = config_from_dict({
        "model_name_or_path": base_dir, "dataset": [str(small_corpus)], "finetuning_type": finetuning_type,
        "lora_rank": 8, "lora_alpha": 16, "block_size": 64, "output_dir": str(tmp_path / "run"),
        "max_steps": 30, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "save_steps": 1000,
        "cache_dir": str(tmp_path / "cache"), "report_to": "none",
    })
    run(config, quiet(), callbacks=[keep])

    quantization = None
    if finetuning_type == "qlora":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    trained = keep.model.eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization, device_map=trained.device)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "run").eval()
    ids = torch.tensor([tokenizer(texts[0]).input_ids[:48]], device=trained.device)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    after = corpus_loss(reloaded, tokenizer, texts)
    assert after < before - 0.1, (before, after)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's call
def test_an_adapter_records_its_base_as_an_absolute_path(pretrained, tiny_llama_config_path, small_corpus,
                                                         tmp_path, monkeypatch):
    """Trained from relative paths, the adapter still loads from anywhere with plain peft."""
    monkeypatch.chdir(tmp_path)
    relative = os.path.relpath(pretrained["dir"], tmp_path)
    for name, source in {"loaded": {"model_name_or_path": relative},
                         "built": {"model_config": str(tiny_llama_config_path),
                                   "tokenizer_name_or_path": relative}}.items():
        run(config_from_dict({
            **source, "dataset": [str(small_corpus)], "finetuning_type": "lora", "block_size": 64,
            "output_dir": name, "max_steps": 1, "cache_dir": "cache", "report_to": "none",
        }), quiet())
    monkeypatch.chdir("/")
    assert PeftConfig.from_pretrained(tmp_path / "loaded").base_model_name_or_path == str(pretrained["dir"].resolve())
    assert PeftConfig.from_pretrained(tmp_path / "built").base_model_name_or_path == str(tmp_path / "built" / "base")
    AutoPeftModelForCausalLM.from_pretrained(tmp_path / "built")


class ReplayPicks(TrainerCallback):
    """Records which replay blocks each epoch trained on."""

    def __init__(self):
        self.epochs = []

    def on_epoch_end(self, args, state, control, train_dataloader=None, **kwargs):
        self.epochs.append(set(train_dataloader.dataset.picked.tolist()))


def test_replay_is_drawn_afresh_each_epoch(pretrained, small_corpus, shared_data, tmp_path):
    picks = ReplayPicks()
    config = config_from_dict({
        "model_name_or_path": str(pretrained["dir"]), "dataset": [str(small_corpus)], "finetuning_type": "lora",
        "replay_dataset": [str(shared_data / "wiki_demo.txt")], "replay_ratio": 0.2, "block_size": 64,
        "replay_sentence_shuffles": 1, "move_openers": True,
        "num_train_epochs": 3, "max_steps": -1, "per_device_train_batch_size": 16, "save_steps": 1000,
        "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "report_to": "none",
    })
    manifest = run(config, quiet(), callbacks=[picks])
    mix = manifest["data"]["replay"]
    assert len(picks.epochs) == 3 and all(len(p) == mix["replay_blocks"] for p in picks.epochs)
    assert mix["replay_available"] >= 3 * mix["replay_blocks"], "wiki_demo has room for three distinct epochs"
    assert not (picks.epochs[0] & picks.epochs[1]) and not (picks.epochs[1] & picks.epochs[2])
    assert mix["shuffled_copies"] > 0 and mix["documents"] > mix["shuffled_copies"]
    assert mix["openers_moved"] > 0  # the run's move_openers reaches the replay copies


def test_held_out_blocks_are_not_trained_on_and_general_text_can_be_evaluated_instead(
    pretrained, small_corpus, shared_data, tmp_path, capfd
):
    common = {"model_name_or_path": str(pretrained["dir"]), "dataset": [str(small_corpus)], "finetuning_type": "lora",
              "block_size": 64, "num_train_epochs": 1, "max_steps": -1, "per_device_train_batch_size": 32,
              "save_steps": 1000, "cache_dir": str(tmp_path / "cache"), "report_to": "none"}
    held = run(config_from_dict({**common, "val_size": 0.25, "output_dir": str(tmp_path / "held")}), quiet())
    blocks, held_out = held["data"]["train"]["blocks"], held["data"]["eval"]["rows"]
    assert held_out == -(-blocks // 4)  # datasets rounds a share of the rows up
    assert held["log_history"][-1]["step"] == -(-(blocks - held_out) // 32)  # one epoch of the rest
    assert held["metrics"]["eval_loss"] > 0 and held["data"]["eval"]["scored_tokens"] <= held_out * 63

    general_text = tmp_path / "general.txt"
    general_text.write_text("\n".join((shared_data / "wiki_demo.txt").read_text().splitlines()[:2]))
    console = quiet()
    general = run(config_from_dict({**common, "eval_dataset": [str(general_text)], "save_steps": 2,
                                    "finetuning_type": "full", "output_dir": str(tmp_path / "general")}), console)
    evaluated = general["data"]["eval"]
    assert evaluated["eval_dataset"] == [str(general_text)] and evaluated["documents"] == 2
    assert evaluated["rows"] == evaluated["blocks"] > 0 and evaluated["shuffled_copies"] == 0
    steps = general["log_history"][-1]["step"]
    evaluations = [entry["step"] for entry in general["log_history"] if "eval_loss" in entry]
    # with every checkpoint, and at the last step (once, when a checkpoint falls there)
    assert set(range(2, steps + 1, 2)) <= set(evaluations) and evaluations[-1] == steps
    assert f"Evaluation: loss {general['metrics']['eval_loss']:.4f}" in console.file.getvalue()
    assert "Evaluation data: 2 documents" in console.file.getvalue()
    assert "Writing model shards" not in capfd.readouterr().err  # no library bar through the training bar


def test_seed_knowledge_recipe_runs_on_a_tiny_llama(tiny_llama_config_path, tokenizer_dir, small_corpus, tmp_path):
    out = tmp_path / "seed"
    main([
        "train", str(REPO / "configs" / "llama2-13b-knowledge-qlora.yaml"),
        "--model_name_or_path", "null", "--model_config", str(tiny_llama_config_path),
        "--tokenizer_name_or_path", str(tokenizer_dir), "--dataset", str(small_corpus),
        "--block_size", "64", "--max_steps", "3", "--output_dir", str(out),
        "--cache_dir", str(tmp_path / "cache"), "--report_to", "none",
    ])
    manifest = json.loads((out / "infuse_run.json").read_text())
    assert manifest["metrics"]["train_loss"] > 0
    assert manifest["config"]["finetuning_type"] == "qlora" and manifest["config"]["num_train_epochs"] == 20
    assert (out / "adapter_model.safetensors").is_file()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == out / "base"


def test_two_processes_under_torchrun_train_one_adapter_print_once_and_close_the_group(
        tiny_llama_dir, shared_data, tmp_path):
    rows = json.loads((shared_data / "alpaca_en_demo.json").read_text())[:32]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "sft", "model_name_or_path": str(tiny_llama_dir), "dataset": [str(tmp_path / "data.json")],
        "template": "chatml", "cutoff_len": 128, "overlong": "truncate", "finetuning_type": "lora",
        "output_dir": str(tmp_path / "run"), "num_train_epochs": 1, "per_device_train_batch_size": 4,
        "logging_steps": 1, "save_steps": 2, "report_to": "none",
    }))
    launched = tmp_path / "launched.py"  # `infuse train`, then whether it left the process group open
    launched.write_text("import sys, torch.distributed as dist\nfrom infuse.cli import main\n"
                        "main(sys.argv[1:])\nprint('process group open:', dist.is_initialized())\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(launched), "train", str(recipe)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})  # CPU processes
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("SFT data:") == 1 and done.stdout.count("Saved the lora adapter") == 1
    assert done.stdout.count("process group open: False") == 2
    manifest = json.loads((tmp_path / "run" / "infuse_run.json").read_text())
    assert manifest["processes"] == 2
    assert manifest["log_history"][-1]["step"] == 4  # 32 samples, 4 a process and step, 2 processes
    assert (tmp_path / "run" / "generation_config.json").is_file()  # written once, by the first process
