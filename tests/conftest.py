"""Shared fixtures: a tiny tokenizer and tiny models built locally, and the real demo data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from infuse.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_LLAMA_CONFIG = REPO / "configs" / "tiny-llama.json"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests read the public demo data from ../shared/data.")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, shared_data) -> Path:
    """A 2048-entry byte-level BPE tokenizer trained on the wiki and c4 demo data."""
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([shared_data / "wiki_demo.txt", shared_data / "c4_demo.jsonl"], 2048, out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_config_path(tmp_path_factory, tokenizer) -> Path:
    """The shipped tiny Llama config with the vocabulary sized to the test tokenizer."""
    config = json.loads(TINY_LLAMA_CONFIG.read_text())
    config["vocab_size"] = len(tokenizer)
    path = tmp_path_factory.mktemp("config") / "tiny-llama.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_llama_config_path, tokenizer) -> Path:
    """A randomly initialised tiny Llama saved with its tokenizer, loadable by from_pretrained."""
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tiny_llama_config_path)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def random_lora_adapter(base_dir: Path, out: Path, seed: int, spread: float, **lora) -> Path:
    """A LoRA adapter on the model in ``base_dir`` whose lora_B weights are drawn from N(0, spread),
    so that, unlike a fresh adapter, it changes the output; saved to ``out``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, spread)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def model_without_chatml_tokens(tiny_llama_dir, shared_data, tmp_path_factory) -> Path:
    """The tiny Llama with a tokenizer that, like Llama 2's, has no <|im_start|>/<|im_end|> and no spare
    embedding rows: 2048 entries for the model's 2048."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train([str(shared_data / "wiki_demo.txt")], trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    assert len(tokenizer) == AutoConfig.from_pretrained(tiny_llama_dir).vocab_size == 2048
    out = tmp_path_factory.mktemp("no-chatml")
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
