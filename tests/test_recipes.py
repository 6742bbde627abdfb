"""The recipes in configs/: every one parses, and the seed recipes train a few steps on tiny models
of the same architecture through the real command. Also the pad_token/padding_side keys they set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from infuse.cli import main
from infuse.config import load_config
from infuse.data.formats import Conversation
from infuse.data.sft import IGNORE_INDEX, PaddedCollator, build_sft_data, tokenize_conversation
from infuse.data.templates import resolve_template
from infuse.errors import InfuseError
from infuse.models import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
GUANACO = CONFIGS / "llama2-7b-chat-guanaco-qlora.yaml"
CHATML_SFT = CONFIGS / "qwen2.5-1.5b-chatml-sft.yaml"
QWEN_PRETRAIN = CONFIGS / "qwen2.5-1.5b-pretrain.yaml"
QA = [("What is the capital of France?", "Paris is the capital of France."),
      ("Name a primary colour.", "Red is a primary colour."),
      ("How many legs has a spider?", "A spider has eight legs."),
      ("What do bees make?", "Bees make honey and wax.")]


def run_dir_files(out: Path) -> tuple[dict, GenerationConfig]:
    manifest = json.loads((out / "infuse_run.json").read_text())
    return manifest, GenerationConfig.from_pretrained(out)


@pytest.fixture(scope="module")
def guanaco_file(tmp_path_factory) -> Path:
    """Guanaco-llama2 style rows: a `text` field in `<s>[INST] q [/INST] a </s>` form."""
    path = tmp_path_factory.mktemp("guanaco") / "train.jsonl"
    rows = [{"text": f"<s>[INST] {q} [/INST] {a} </s>"} for q, a in QA * 2]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def sharegpt_file(tmp_path_factory) -> Path:
    """Multi-turn human/assistant conversations with a system prompt, as the ChatML seed recipe reads."""
    path = tmp_path_factory.mktemp("sharegpt") / "chat.jsonl"
    rows = []
    for (q1, a1), (q2, a2) in zip(QA, QA[1:] + QA[:1], strict=True):
        turns = [("human", q1), ("assistant", a1), ("human", q2), ("assistant", a2)]
        rows.append({"system": "You are a concise assistant.",
                     "conversations": [{"from": who, "value": text} for who, text in turns]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny_qwen2_dir(tmp_path_factory, tokenizer) -> Path:
    """configs/tiny-qwen2.json (the Qwen2.5 architecture, 2 layers of 64) saved with the test tokenizer."""
    config = AutoConfig.from_pretrained(CONFIGS / "tiny-qwen2.json")
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-qwen2")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --- every recipe -----------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_parses_and_names_the_command_that_runs_it(recipe):
    config = load_config(recipe)  # unknown keys and bad values are errors
    header = recipe.read_text().splitlines()[:12]
    assert any(line.startswith("#   infuse train configs/" + recipe.name) or
               f"train configs/{recipe.name}" in line for line in header), header
    for path in (config.model_config, config.training.get("deepspeed")):
        if path:
            assert (REPO / path).is_file(), path


def test_qwen_shape_config_has_the_parameters_of_qwen2_5_1_5b():
    config = AutoConfig.from_pretrained(CONFIGS / "qwen2.5-1.5b.json")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert config.model_type == "qwen2" and config.tie_word_embeddings
    assert 1.53e9 < sum(p.numel() for p in model.parameters()) < 1.55e9  # Qwen2.5-1.5B: 1.54B
    assert json.loads((CONFIGS / "deepspeed" / "zero2.json").read_text())["zero_optimization"]["stage"] == 2


def test_the_seed_chat_recipe_keeps_the_seed_settings():
    config = load_config(GUANACO)
    training = config.training
    assert (config.stage, config.dataset_format, config.finetuning_type) == ("sft", "text", "qlora")
    assert (config.quantization_type, config.double_quantization, training["fp16"]) == ("nf4", False, True)
    assert (config.lora_rank, config.lora_alpha, config.lora_dropout) == (8, 16, 0.1)
    assert (config.pad_token, config.padding_side, config.packing) == ("eos", "right", False)
    assert training["optim"] == "paged_adamw_32bit" and training["learning_rate"] == 2e-4
    assert (training["weight_decay"], training["max_grad_norm"]) == (0.001, 0.3)
    assert training["warmup_steps"] == 0.03  # warmup_ratio, in transformers 5's name
    assert training["lr_scheduler_type"] == "constant"
    assert training["train_sampling_strategy"] == "group_by_length"
    assert (training["num_train_epochs"], training["per_device_train_batch_size"]) == (1, 4)


# --- the seed recipes on tiny models ----------------------------------------------------------------


def test_seed_chat_recipe_trains_on_a_tiny_llama(tiny_llama_dir, guanaco_file, tmp_path):
    # fp16 and paged_adamw_32bit run on the CPU too (bitsandbytes falls back to its unpaged AdamW),
    # so only sizes are overridden: the tiny Llama has 512 positions, the recipe asks for 1024.
    out = tmp_path / "guanaco"
    main(["train", str(GUANACO), "--model_name_or_path", str(tiny_llama_dir), "--dataset", str(guanaco_file),
          "--cutoff_len", "256", "--max_steps", "3", "--output_dir", str(out), "--report_to", "none"])
    manifest, generation = run_dir_files(out)
    data = manifest["data"]["train"]
    assert data["samples"] == 8 and 0 < data["trained_tokens"] < data["tokens"] / 2
    assert manifest["metrics"]["train_loss"] > 0 and manifest["config"]["optim"] == "paged_adamw_32bit"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["lora_dropout"]) == (8, 16, 0.1)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "right"
    assert tokenizer.chat_template == resolve_template(tokenizer, "llama2")
    assert generation.eos_token_id == [tokenizer.eos_token_id]  # llama2's end of turn is eos


def test_seed_chatml_recipe_trains_on_a_tiny_qwen2(tiny_qwen2_dir, sharegpt_file, tmp_path):
    out = tmp_path / "chatml"
    main(["train", str(CHATML_SFT), "--model_name_or_path", str(tiny_qwen2_dir), "--dataset",
          str(sharegpt_file), "--cutoff_len", "512", "--max_steps", "3", "--output_dir", str(out),
          "--report_to", "none"])
    manifest, generation = run_dir_files(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    answers = [a for _, a in QA] * 2
    # Only the assistant turns and their <|im_end|> train: not the system prompt, not the questions.
    expected = sum(len(tokenizer(a + "<|im_end|>", add_special_tokens=False)["input_ids"]) for a in answers)
    data = manifest["data"]["train"]
    assert data["formats"] == {str(sharegpt_file): "sharegpt"} and data["trained_tokens"] == expected
    assert AutoConfig.from_pretrained(out).model_type == "qwen2" and (out / "model.safetensors").is_file()
    assert tokenizer.chat_template == resolve_template(tokenizer, "chatml")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation.eos_token_id == [tokenizer.eos_token_id, im_end]


def test_qwen_pretrain_recipe_runs_without_deepspeed_on_a_tiny_qwen2(tokenizer_dir, shared_data, tmp_path):
    pages = tmp_path / "pages.jsonl"
    pages.write_text("".join((shared_data / "c4_demo.jsonl").read_text().splitlines(keepends=True)[:20]))
    overrides = ["--model_config", str(CONFIGS / "tiny-qwen2.json"), "--tokenizer_name_or_path",
                 str(tokenizer_dir), "--dataset", str(pages), "--block_size", "128",
                 "--max_steps", "2", "--gradient_accumulation_steps", "1", "--report_to", "none",
                 "--output_dir", str(tmp_path / "pt"), "--cache_dir", str(tmp_path / "cache")]
    with pytest.raises(InfuseError, match="DeepSpeed is not installed"):
        load_config(QWEN_PRETRAIN, overrides).training_arguments()
    main(["train", str(QWEN_PRETRAIN), *overrides, "--deepspeed", "null"])
    manifest = json.loads((tmp_path / "pt" / "infuse_run.json").read_text())
    assert manifest["config"]["bf16"] and manifest["config"]["activation_checkpointing"]
    assert manifest["data"]["train"]["block_size"] == 128 and manifest["metrics"]["train_loss"] > 0


# --- pad_token and padding_side ---------------------------------------------------------------------


def test_pad_token_key_takes_eos_unk_or_a_token_and_refuses_others(tiny_llama_dir, guanaco_file, tmp_path):
    def tokenizer_with(**keys):
        values = [item for key, value in keys.items() for item in (f"--{key}", value)]
        return load_tokenizer(load_config(None, ["--model_name_or_path", str(tiny_llama_dir), "--dataset",
                                                 str(guanaco_file), "--output_dir", str(tmp_path), *values]))

    assert tokenizer_with().pad_token == "<pad>"
    assert tokenizer_with(pad_token="eos").pad_token == "</s>"
    assert tokenizer_with(pad_token="<unk>", padding_side="left").pad_token == "<unk>"
    assert tokenizer_with(padding_side="left").padding_side == "left"
    with pytest.raises(InfuseError, match="'<nope>' is not a token of the tokenizer's vocabulary"):
        tokenizer_with(pad_token="<nope>")


def test_seed_recipe_with_pad_equal_to_eos_trains_every_answer_end_in_padded_batches(
    tiny_llama_dir, guanaco_file, tmp_path
):
    config = load_config(GUANACO, ["--model_name_or_path", str(tiny_llama_dir),
                                   "--dataset", str(guanaco_file), "--output_dir", str(tmp_path)])
    tokenizer = load_tokenizer(config)
    data = build_sft_data(config, tokenizer)
    assert isinstance(data.collator, PaddedCollator) and tokenizer.pad_token_id == tokenizer.eos_token_id
    features = [data.dataset[i] for i in range(4)]
    batch = data.collator(features)
    eos = tokenizer.eos_token_id
    for row, feature in enumerate(features):
        length = len(feature["input_ids"])
        assert batch["labels"][row, length - 1] == eos  # the answer's </s>, same id as the padding after it
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, length:] == eos).all()
    assert (batch["labels"] == eos).sum() == len(features)
    assert (batch["input_ids"] == eos).sum() > len(features)  # padding there is, all of it masked


def test_left_padding_gives_each_sample_the_loss_it_has_alone(tiny_llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    template = resolve_template(tokenizer, "chatml")
    conversations = [Conversation([{"role": "user", "content": q}, {"role": "assistant", "content": a * n}])
                     for n, (q, a) in enumerate(QA, start=1)]
    features = [dict(zip(("input_ids", "labels"), tokenize_conversation(c, tokenizer, template), strict=True))
                for c in conversations]

    def sample_losses(collator: PaddedCollator, batch_features: list[dict]) -> torch.Tensor:
        batch = collator(batch_features)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                   ignore_index=IGNORE_INDEX, reduction="none")
        return losses.sum(1) / (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)

    left_collator = PaddedCollator(tokenizer.pad_token_id, padding_side="left")
    with torch.no_grad():
        alone = torch.cat([sample_losses(PaddedCollator(tokenizer.pad_token_id), [f]) for f in features])
        right = sample_losses(PaddedCollator(tokenizer.pad_token_id), features)
        left = sample_losses(left_collator, features)
    assert left_collator(features)["input_ids"][0, 0] == tokenizer.pad_token_id  # really padded on the left
    assert (left - alone).abs().max() <= 1e-4 and (right - alone).abs().max() <= 1e-4
    assert alone.std() > 0.01  # the samples differ, so equal losses mean something
