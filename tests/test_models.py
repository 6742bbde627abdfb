"""Models: building from a config, loading, full / LoRA / QLoRA wrapping, adapters and the errors."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from infuse.config import config_from_dict
from infuse.errors import InfuseError
from infuse.models import (
    compute_dtype,
    count_parameters,
    describe_model,
    load_for_inference,
    load_model,
    load_tokenizer,
    quantization_config,
)

TINY_SHAPES = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False}
# Vocabularies smaller than the 2048-entry test tokenizer: the build must grow them to fit it.
OTHER_ARCHITECTURES = {
    "qwen2": {"model_type": "qwen2", "vocab_size": 1000, **TINY_SHAPES},
    "mistral": {"model_type": "mistral", "vocab_size": 1500, "sliding_window": 128, **TINY_SHAPES},
}


def make_config(tmp_path: Path, **values):
    base = {"dataset": ["unused.jsonl"], "output_dir": str(tmp_path / "out"), "report_to": "none",
            "block_size": 128, "cutoff_len": 128}
    return config_from_dict({**base, **values})


def lora_size(model: torch.nn.Module, rank: int, names: set[str] | None = None) -> int:
    """What LoRA of this rank adds to a plain model's linear layers: r * (in + out) for each."""
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    return sum(rank * (m.in_features + m.out_features) for n, m in linear.items()
               if names is None or n.split(".")[-1] in names)


def train_step(model) -> torch.Tensor:
    ids = torch.arange(2, 66).view(2, 32).to(model.device)  # a 4-bit model sits on the GPU where there is one
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    return loss


def randomize_lora(model) -> None:
    """LoRA starts as a no-op (B = 0); give B values so an adapter changes the logits."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    model.eval()
    return model(input_ids=torch.arange(5, 45).view(2, 20).to(model.device)).logits.float().cpu()


@pytest.fixture(scope="module")
def plain_llama(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def llama_for_4bit_inference(tmp_path_factory, tiny_llama_config_path, tokenizer) -> Path:
    """The tiny Llama with intermediate_size 192. On CPUs with AVX-512 BF16, bitsandbytes runs
    4-bit layers in eval mode through a packed kernel that needs out_features divisible by 32."""
    config = AutoConfig.from_pretrained(tiny_llama_config_path)
    config.intermediate_size = 192
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("llama-192")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------- building from a config


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "mistral"])
def test_build_from_config_matches_a_direct_build_and_fits_the_tokenizer(
    architecture, tmp_path, tiny_llama_config_path, tokenizer_dir, tokenizer
):
    if architecture == "llama":
        config_path = tiny_llama_config_path
    else:
        config_path = tmp_path / f"tiny-{architecture}.json"
        config_path.write_text(json.dumps(OTHER_ARCHITECTURES[architecture]))
    config = make_config(tmp_path, model_config=str(config_path), tokenizer_name_or_path=str(tokenizer_dir),
                         finetuning_type="full", bf16=True)
    model = load_model(config, load_tokenizer(config))

    direct = AutoConfig.from_pretrained(config_path)
    direct.vocab_size = len(tokenizer)
    expected = sum(p.numel() for p in AutoModelForCausalLM.from_config(direct).parameters())
    assert model.config.model_type == architecture
    assert count_parameters(model) == (expected, expected)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == 2048
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    # Full training keeps float32 weights even with bf16 on: bf16 is the Trainer's autocast.
    assert model.dtype == torch.float32


def test_build_is_seeded_by_the_training_seed(tmp_path, tiny_llama_config_path, tokenizer_dir):
    def build(seed):
        config = make_config(tmp_path, model_config=str(tiny_llama_config_path),
                             tokenizer_name_or_path=str(tokenizer_dir), finetuning_type="full", seed=seed)
        return load_model(config, load_tokenizer(config)).lm_head.weight

    assert torch.equal(build(7), build(7))
    assert not torch.equal(build(7), build(8))


def test_qlora_on_a_model_built_from_config_is_quantized(tmp_path, tiny_llama_config_path, tokenizer_dir):
    config = make_config(tmp_path, model_config=str(tiny_llama_config_path),
                         tokenizer_name_or_path=str(tokenizer_dir), finetuning_type="qlora")
    model = load_model(config, load_tokenizer(config))
    assert isinstance(model.base_model.model.model.layers[0].mlp.up_proj.base_layer, bnb.nn.Linear4bit)
    train_step(model)


# ---------------------------------------------------------------- full / lora / qlora


def test_full_finetuning_trains_every_weight(tmp_path, tiny_llama_dir, plain_llama):
    model = load_model(make_config(tmp_path, model_name_or_path=str(tiny_llama_dir), finetuning_type="full"),
                       None)
    total = sum(p.numel() for p in plain_llama.parameters())
    assert count_parameters(model) == (total, total)
    train_step(model)
    assert all(p.grad is not None for p in model.parameters())


def test_lora_trains_only_the_adapters(tmp_path, tiny_llama_dir, plain_llama):
    config = make_config(tmp_path, model_name_or_path=str(tiny_llama_dir), lora_rank=4)
    model = load_model(config, None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    added = lora_size(plain_llama, 4)
    base = sum(p.numel() for p in plain_llama.parameters())
    assert count_parameters(model) == (added, base + added) == model.get_nb_trainable_parameters()
    train_step(model)
    assert all((p.grad is not None) == (n in trainable) for n, p in model.named_parameters())


def test_dora_adds_a_trained_magnitude_and_rslora_scales_by_the_root_of_the_rank(tmp_path, tiny_llama_dir):
    config = make_config(tmp_path, model_name_or_path=str(tiny_llama_dir), lora_rank=4, lora_alpha=16,
                         use_dora=True, use_rslora=True)
    model = load_model(config, None)
    magnitudes = {n for n, p in model.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad}
    assert magnitudes and len(magnitudes) == sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(16 / 4 ** 0.5)  # plain LoRA: 16 / 4
    train_step(model)
    assert all(model.get_parameter(n).grad is not None for n in magnitudes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for bitsandbytes on a CPU")
def test_dora_on_a_4bit_base_is_refused_on_a_cpu(tmp_path, tiny_llama_dir):
    config = make_config(tmp_path, model_name_or_path=str(tiny_llama_dir), finetuning_type="qlora", use_dora=True)
    with pytest.raises(InfuseError, match="use_dora with finetuning_type: qlora needs a CUDA GPU"):
        load_model(config, None)


def test_lora_target_names_wrap_only_those_modules(tmp_path, tiny_llama_dir, plain_llama):
    config = make_config(tmp_path, model_name_or_path=str(tiny_llama_dir), lora_target=["q_proj", "v_proj"],
                         bf16=True)
    model = load_model(config, None)
    wrapped = {n.split(".")[-2] for n, _ in model.named_modules() if n.endswith(".lora_A")}
    assert wrapped == {"q_proj", "v_proj"}
    # The frozen base is stored in the compute dtype; peft keeps the adapters in float32.
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.base_layer.weight.dtype == torch.bfloat16
    assert q_proj.lora_A["default"].weight.dtype == torch.float32
    assert count_parameters(model)[0] == lora_size(plain_llama, 8, {"q_proj", "v_proj"})
    train_step(model)


@pytest.mark.parametrize("target, names", [("all", None), ("q_proj, v_proj", {"q_proj", "v_proj"})])
def test_lora_target_takes_llama_factorys_spellings(tmp_path, tiny_llama_dir, plain_llama, target, names):
    model = load_model(make_config(tmp_path, model_name_or_path=str(tiny_llama_dir), lora_target=target), None)
    assert count_parameters(model)[0] == lora_size(plain_llama, 8, names)


@pytest.mark.parametrize("precision, double", [({"bf16": True}, True), ({}, False)])
def test_qlora_quantizes_the_base_and_trains_the_adapters(precision, double, tmp_path, tiny_llama_dir,
                                                          plain_llama):
    config = make_config(tmp_path, model_name_or_path=str(tiny_llama_dir), finetuning_type="qlora",
                         double_quantization=double, **precision)
    model = load_model(config, None)
    layer = model.base_model.model.model.layers[1].self_attn.k_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.compute_dtype == (torch.bfloat16 if precision else torch.float32)
    assert layer.weight.quant_state.nested is double and layer.weight.quant_state.quant_type == "nf4"
    added = lora_size(plain_llama, 8)
    base = sum(p.numel() for p in plain_llama.parameters())
    # 4-bit weights pack two values a byte; counted as the elements they stand for, the base is unchanged.
    assert count_parameters(model) == (added, base + added) == model.get_nb_trainable_parameters()
    train_step(model)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_8_bit_qlora_trains_the_adapters(tmp_path, tiny_llama_dir, plain_llama):
    config = make_config(tmp_path, model_name_or_path=str(tiny_llama_dir), finetuning_type="qlora",
                         quantization_bit=8)
    model = load_model(config, None)
    assert isinstance(model.base_model.model.model.layers[0].mlp.down_proj.base_layer, bnb.nn.Linear8bitLt)
    assert count_parameters(model)[0] == lora_size(plain_llama, 8)
    train_step(model)


def test_modules_to_save_train_in_full_next_to_the_adapters(tmp_path, tiny_llama_dir, plain_llama):
    config = make_config(tmp_path, model_name_or_path=str(tiny_llama_dir), modules_to_save=["lm_head"])
    model = load_model(config, None)
    assert count_parameters(model)[0] == lora_size(plain_llama, 8) + plain_llama.lm_head.weight.numel()
    train_step(model)
    assert model.base_model.model.lm_head.modules_to_save["default"].weight.grad is not None


def test_activation_checkpointing_gives_the_same_gradients(tmp_path, tiny_llama_dir):
    def lora_b_grads(**extra):
        config = make_config(tmp_path, model_name_or_path=str(tiny_llama_dir), lora_dropout=0.0, **extra)
        model = load_model(config, None)
        train_step(model)
        return model, torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "lora_B" in n])

    checkpointed, grads = lora_b_grads(gradient_checkpointing=True)
    assert checkpointed.base_model.model.is_activation_checkpointing
    plain, expected = lora_b_grads()
    assert not plain.base_model.model.is_activation_checkpointing
    assert expected.abs().sum() > 0
    torch.testing.assert_close(grads, expected)


def test_describe_model_prints_the_counts(tmp_path, tiny_llama_dir, plain_llama):
    model = load_model(make_config(tmp_path, model_name_or_path=str(tiny_llama_dir)), None)
    out = io.StringIO()
    describe_model(model, Console(file=out, width=200))
    trainable, total = lora_size(plain_llama, 8), lora_size(plain_llama, 8) + plain_llama.num_parameters()
    assert f"{trainable:,} trainable of {total:,}" in out.getvalue()


def test_compute_dtype_follows_the_precision_switches():
    assert compute_dtype({"bf16": True}) == torch.bfloat16
    assert compute_dtype({"fp16": True}) == torch.float16
    assert compute_dtype({}) == torch.float32


# ---------------------------------------------------------------- adapters round trip


PEFT_ON_TRANSFORMERS_5 = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"


@pytest.mark.filterwarnings(PEFT_ON_TRANSFORMERS_5)
def test_lora_adapter_reloads_with_plain_peft_and_for_inference(tmp_path, tiny_llama_dir):
    model = load_model(make_config(tmp_path, model_name_or_path=str(tiny_llama_dir)), None)
    randomize_lora(model)
    trained = logits_of(model)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)

    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter)
    assert (logits_of(fresh) - trained).abs().max().item() == 0
    with fresh.disable_adapter():
        assert (logits_of(fresh) - trained).abs().max().item() > 0.01  # the adapter matters

    served, tokenizer = load_for_inference(f"{tiny_llama_dir}+{adapter}", dtype=torch.float32, device="cpu")
    assert not served.training and tokenizer.pad_token == "<pad>"
    assert torch.equal(logits_of(served), trained)
    alone, _ = load_for_inference(str(adapter), dtype=torch.float32, device="cpu")  # base from adapter_config
    assert torch.equal(logits_of(alone), trained)


@pytest.mark.filterwarnings(PEFT_ON_TRANSFORMERS_5)
def test_qlora_adapter_reloads_on_the_same_quantized_base(tmp_path, llama_for_4bit_inference):
    base_dir = llama_for_4bit_inference
    config = make_config(tmp_path, model_name_or_path=str(base_dir), finetuning_type="qlora")
    model = load_model(config, None)
    randomize_lora(model)
    trained = logits_of(model)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)

    quantization = quantization_config(config)
    device = model.get_base_model().device  # the GPU where there is one: the same kernels give the same logits
    base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization,
                                                dtype=torch.float32, device_map=device)
    fresh = PeftModel.from_pretrained(base, adapter)
    assert (logits_of(fresh) - trained).abs().max().item() == 0
    served, _ = load_for_inference(f"{base_dir}+{adapter}", dtype=torch.float32, device=str(device),
                                   quantization=quantization)
    assert torch.equal(logits_of(served), trained)


def test_inference_tokenizer_comes_from_the_adapter_dir_when_it_has_one(tmp_path, tiny_llama_dir, tokenizer):
    model = load_model(make_config(tmp_path, model_name_or_path=str(tiny_llama_dir)), None)
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    (adapter / "chat_template.jinja").write_text("ADAPTER TEMPLATE")
    _, loaded = load_for_inference(f"{tiny_llama_dir}+{adapter}", device="cpu")
    assert loaded.chat_template == "ADAPTER TEMPLATE"


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_without_pad_pads_with_unk_then_eos(tmp_path, tokenizer_dir, tiny_llama_dir, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "no-pad")
    config = make_config(tmp_path, model_name_or_path=str(tiny_llama_dir),
                         tokenizer_name_or_path=str(tmp_path / "no-pad"))
    with caplog.at_level(logging.WARNING, logger="infuse.models"):
        assert load_tokenizer(config).pad_token == "<unk>"
    assert "padding with its unk token '<unk>'" in caplog.text

    tokenizer.unk_token = None
    tokenizer.save_pretrained(tmp_path / "no-pad-no-unk")
    config = make_config(tmp_path, model_name_or_path=str(tiny_llama_dir),
                         tokenizer_name_or_path=str(tmp_path / "no-pad-no-unk"))
    assert load_tokenizer(config).pad_token == "</s>"


# ---------------------------------------------------------------- errors


def test_missing_model_path_is_named_with_what_to_do(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(InfuseError, match=f"Model path {missing} does not exist.*model_name_or_path"):
        load_model(make_config(tmp_path, model_name_or_path=str(missing)), None)
    with pytest.raises(InfuseError, match="hf download meta-llama/Llama-2-13b-hf"):
        load_for_inference("meta-llama/Llama-2-13b-hf")


def test_model_dir_without_weights_lists_what_it_found(tmp_path, tiny_llama_dir):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", folder)
    shutil.copy(tiny_llama_dir / "tokenizer.json", folder)
    with pytest.raises(InfuseError) as error:
        load_model(make_config(tmp_path, model_name_or_path=str(folder)), None)
    message = str(error.value)
    assert "expected config.json and weights (model.safetensors" in message
    assert "found config.json, tokenizer.json." in message


def test_block_size_longer_than_the_context_is_refused(tmp_path, tiny_llama_dir, tiny_llama_config_path,
                                                       tokenizer_dir):
    with pytest.raises(InfuseError, match="block_size 1024 is longer.*max_position_embeddings is 512"):
        load_model(make_config(tmp_path, model_name_or_path=str(tiny_llama_dir), block_size=1024), None)
    config = make_config(tmp_path, stage="sft", model_config=str(tiny_llama_config_path),
                         tokenizer_name_or_path=str(tokenizer_dir), cutoff_len=600)
    with pytest.raises(InfuseError, match="cutoff_len 600 is longer.*Set cutoff_len to 512 or less"):
        load_model(config, load_tokenizer(config))


def test_model_config_needs_a_tokenizer(tmp_path, tiny_llama_config_path):
    with pytest.raises(InfuseError, match="no tokenizer of its own.*tokenizer_name_or_path"):
        load_tokenizer(make_config(tmp_path, model_config=str(tiny_llama_config_path)))


def test_unknown_lora_target_lists_the_linear_layers(tmp_path, tiny_llama_dir):
    config = make_config(tmp_path, model_name_or_path=str(tiny_llama_dir), lora_target=["query"])
    with pytest.raises(InfuseError, match="down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        load_model(config, None)


def test_adapter_that_is_not_an_adapter(tmp_path, tiny_llama_dir):
    expected = "not a PEFT adapter: expected adapter_config.json.*found .*config.json"
    with pytest.raises(InfuseError, match=expected):
        load_for_inference(f"{tiny_llama_dir}+{tiny_llama_dir}", device="cpu")
