"""``infuse merge`` on a real QLoRA run of the tiny Llama: the merged model matches the quantized
base + adapter it was trained as, loads with plain transformers, and broken merges are refused."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import random_lora_adapter
from peft import PeftModel
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GenerationConfig

from infuse.cli import main
from infuse.config import config_from_dict
from infuse.errors import InfuseError
from infuse.merge import merge
from infuse.models import load_for_inference
from infuse.train import run

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_llama_dir, shared_data) -> Path:
    """A QLoRA (4-bit nf4) run of a few steps on twenty c4 pages: adapter + infuse_run.json, and the
    same adapter in checkpoint-4."""
    rows = (shared_data / "c4_demo.jsonl").read_text().splitlines()[:20]
    out = tmp_path_factory.mktemp("qlora")
    (out / "corpus.jsonl").write_text("\n".join(rows) + "\n")
    run(config_from_dict({
        "model_name_or_path": str(tiny_llama_dir), "dataset": [str(out / "corpus.jsonl")],
        "finetuning_type": "qlora", "lora_rank": 8, "lora_alpha": 16, "block_size": 64,
        "output_dir": str(out / "run"), "max_steps": 4, "per_device_train_batch_size": 4,
        "learning_rate": 1e-2, "save_steps": 4, "cache_dir": str(out / "cache"), "report_to": "none",
    }), quiet())
    return out / "run"


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """On the model's device (a 4-bit model is on the GPU where there is one), returned on the CPU."""
    return model(input_ids=ids.to(model.device)).logits[0].float().cpu()


def test_qlora_adapter_merges_passes_the_check_and_loads_with_plain_transformers(
        qlora_run, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    main(["merge", "--adapter", str(qlora_run), "--output", str(out)])  # the base comes from the run
    captured = capsys.readouterr()
    printed = " ".join(captured.out.split())
    assert "max abs diff" in printed and "top-1 agreement" in printed
    assert "Loading weights" not in captured.err and "Writing" not in captured.err  # no library bars in a log
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    record = json.loads((out / "infuse_merge.json").read_text())
    assert record["check"]["passed"] and record["trained_as"].startswith("4-bit nf4")

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tokenizer("The history of the city begins with a small settlement").input_ids])
    merged = logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids)  # no peft involved
    quantized = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    trained = logits(PeftModel.from_pretrained(quantized, qlora_run).eval(), ids)
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), ids)
    drift = (merged - trained).abs().max().item()
    assert drift <= 0.02 * trained.abs().max().item()
    assert (merged.argmax(-1) == trained.argmax(-1)).float().mean() >= 0.9
    # The adapter really changed the model, and the merge kept that change.
    assert (trained - base).abs().max().item() > 10 * drift


def test_a_qlora_checkpoint_merges_as_trained_from_any_directory(qlora_run, tiny_llama_dir, tmp_path, monkeypatch):
    run = shutil.copytree(qlora_run, tmp_path / "run")
    manifest = json.loads((run / "infuse_run.json").read_text())
    manifest["config"]["model_name_or_path"] = "models/tiny-llama"  # as typed, relative to where it ran
    (run / "infuse_run.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)
    for adapter in (run, run / "checkpoint-4"):
        out = tmp_path / f"merged-{adapter.name}"
        check = merge(adapter, out, console=quiet())
        record = json.loads((out / "infuse_merge.json").read_text())
        assert check.passed and record["trained_as"].startswith("4-bit nf4"), record
        assert record["base"] == str(tiny_llama_dir)
    assert record["trained_as_source"].endswith("checkpoint-4/infuse_seal.json")


def test_merging_into_the_original_weights_is_refused_as_degraded(qlora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--adapter", str(qlora_run), "--output", str(out), "--merge-into", "original"])
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Refusing to save" in err and "--merge-into dequantized" in err
    assert not out.exists() and not list(tmp_path.glob(".merged.partial-*"))


def test_an_adapter_for_another_base_is_refused(qlora_run, tmp_path, tiny_llama_config_path):
    spec = json.loads(tiny_llama_config_path.read_text()) | {"hidden_size": 32, "intermediate_size": 96}
    other = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec))
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir)
    with pytest.raises(InfuseError, match="does not fit the base"):
        merge(qlora_run, tmp_path / "merged", base=other_dir, console=quiet())


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_llama_dir) -> Path:
    """A plain LoRA adapter made with peft, its lora_B nonzero."""
    return random_lora_adapter(tiny_llama_dir, tmp_path_factory.mktemp("lora"), seed=0, spread=0.3,
                               r=4, target_modules=["q_proj", "v_proj"])


def test_plain_lora_adapter_merges_to_the_same_logits(lora_adapter, tiny_llama_dir, tmp_path):
    check = merge(lora_adapter, tmp_path / "merged", base=tiny_llama_dir, console=quiet())
    assert check.passed and check.relative_diff < 1e-5 and check.top1_agreement == 1.0
    assert check.reference == "base (auto) + adapter"
    ids = torch.tensor([[5, 17, 300, 41, 9]])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), lora_adapter)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits(merged, ids), logits(adapted.eval(), ids), atol=1e-5)


def test_the_merged_model_and_base_plus_adapter_stop_where_the_adapter_learnt_to(
        lora_adapter, tiny_llama_dir, tmp_path):
    adapter = shutil.copytree(lora_adapter, tmp_path / "adapter")
    GenerationConfig(eos_token_id=[2, 5]).save_pretrained(adapter)  # as an SFT run adds its <|im_end|>
    assert AutoModelForCausalLM.from_pretrained(tiny_llama_dir).generation_config.eos_token_id != [2, 5]
    merge(adapter, tmp_path / "merged", base=tiny_llama_dir, console=quiet())
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == [2, 5]
    model, _ = load_for_inference(f"{tiny_llama_dir}+{adapter}", device="cpu")
    assert model.generation_config.eos_token_id == [2, 5]


def test_a_dora_adapter_merges_to_the_same_logits(tiny_llama_dir, tmp_path):
    adapter = random_lora_adapter(tiny_llama_dir, tmp_path / "dora", seed=1, spread=0.3, r=4, use_dora=True,
                                  target_modules=["q_proj", "v_proj", "down_proj"])
    check = merge(adapter, tmp_path / "merged", base=tiny_llama_dir, console=quiet())
    assert check.passed and check.relative_diff < 1e-5 and check.top1_agreement == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the merge would build its reference on the GPU")
def test_a_dora_adapter_of_a_4bit_base_merges_on_a_cpu(tiny_llama_dir, tmp_path):
    # As a QDoRA run on a GPU leaves it. On a CPU, base + adapter as trained cannot be computed:
    # bitsandbytes repacks the 4-bit weights and DoRA reads wrong norms from them.
    adapter = random_lora_adapter(tiny_llama_dir, tmp_path / "qdora", seed=1, spread=0.3, r=4, use_dora=True,
                                  target_modules=["q_proj", "v_proj", "down_proj"])
    run_config = {"finetuning_type": "qlora", "model_name_or_path": str(tiny_llama_dir), "bf16": True}
    (adapter / "infuse_run.json").write_text(json.dumps({"config": run_config}))
    check = merge(adapter, tmp_path / "merged", console=quiet())
    assert check.passed and check.top1_agreement >= 0.95
    assert check.reference.startswith("the dequantized 4-bit nf4 base + adapter, compute bfloat16")


def test_an_adapter_with_nan_weights_is_refused(lora_adapter, tiny_llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(lora_adapter, broken)
    weights = load_file(broken / "adapter_model.safetensors")
    name = next(k for k in weights if "lora_B" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "adapter_model.safetensors")
    with pytest.raises(InfuseError, match="non-finite weights") as caught:
        merge(broken, tmp_path / "merged", base=tiny_llama_dir, console=quiet())
    assert "max abs diff nan" in str(caught.value) and "top-1 agreement 0.00%" in str(caught.value)
    assert not (tmp_path / "merged").exists()


def test_merge_never_overwrites(qlora_run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep")
    with pytest.raises(InfuseError, match="not empty"):
        merge(qlora_run, tmp_path / "taken", console=quiet())
    assert (tmp_path / "taken" / "file").read_text() == "keep"
