"""Attention per packed sample and logits only where trained: the same losses and gradients as the
full computation (sdpa with the block mask, every logit), inside the Trainer too, and the switches
only where they are exact."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from rich.console import Console
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from infuse import packing
from infuse.config import config_from_dict
from infuse.data.formats import load_conversations
from infuse.data.sft import IGNORE_INDEX, PackedCollator, PaddedCollator, build_sft_dataset
from infuse.data.templates import resolve_template
from infuse.packing import (
    SAMPLE_ATTENTION,
    logits_where_trained,
    prepare_sft_batches,
    use_sample_attention,
)
from infuse.train import run

TOLERANCE = 1e-5
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def features(tiny_llama_dir, shared_data) -> list[dict]:
    """Chat samples of many lengths: alpaca rows (long answers) between identity rows (half prompt)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    alpaca, _ = load_conversations([shared_data / "alpaca_en_demo.json"])
    identity, _ = load_conversations([shared_data / "identity.json"], placeholders={"name": "A", "author": "B"})
    mixed = [c for pair in zip(alpaca[:6], identity[:6], strict=True) for c in pair]
    dataset, _ = build_sft_dataset(mixed, tokenizer, resolve_template(tokenizer, "chatml"), 192, overlong="truncate")
    samples = [dataset[i] for i in range(len(dataset))]
    assert len({len(s["input_ids"]) for s in samples[:6]}) >= 4
    return samples


def model_from(folder, attention: str = "sdpa"):
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attention, dtype=torch.float32)


def loss_and_grads(model, batch: dict) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def assert_same(reference: tuple, other: tuple) -> None:
    (loss, grads), (other_loss, other_grads) = reference, other
    assert abs(loss - other_loss) <= TOLERANCE
    assert max((a - b).abs().max().item() for a, b in zip(grads, other_grads, strict=True)) <= TOLERANCE


@pytest.fixture
def sdpa_calls(monkeypatch) -> list[tuple[int, bool, bool]]:
    """Records each sdpa call as (query length, whether it got a mask, whether it was told to be causal)."""
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        calls.append((query.shape[2], kwargs.get("attn_mask") is not None, bool(kwargs.get("is_causal"))))
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def test_attention_per_sample_gives_the_losses_and_gradients_of_the_block_mask(tiny_llama_dir, features,
                                                                                sdpa_calls, monkeypatch):
    batch = PackedCollator()(features[:6])
    masked = model_from(tiny_llama_dir)
    reference = loss_and_grads(masked, batch)
    assert_same(reference, loss_and_grads(model_from(tiny_llama_dir, "eager"), batch))

    per_sample = model_from(tiny_llama_dir)
    assert use_sample_attention(per_sample) and per_sample.config._attn_implementation == SAMPLE_ATTENTION
    sdpa_calls.clear()
    assert_same(reference, loss_and_grads(per_sample, batch))
    each = [(len(f["input_ids"]), False, True) for f in features[:6]]
    assert sdpa_calls == each * per_sample.config.num_hidden_layers  # one causal call per sample, no mask
    monkeypatch.undo()
    with torch.no_grad():  # the same logits; read as one sample, the row would give others
        logits = per_sample(**batch).logits
        assert (logits - masked(**batch).logits).abs().max() <= TOLERANCE
        assert (logits - per_sample(input_ids=batch["input_ids"]).logits).abs().max() > 100 * TOLERANCE


@pytest.mark.parametrize("window", [None, 16])
def test_a_qwen2_is_exact_too_and_its_sliding_window_layers_keep_the_mask(tokenizer, features, window):
    masked, per_sample = tiny_qwen2(len(tokenizer), window), tiny_qwen2(len(tokenizer), window)
    assert use_sample_attention(per_sample)
    batch = PackedCollator()(features[:6])
    assert_same(loss_and_grads(masked, batch), loss_and_grads(per_sample, batch))
    if window:  # the window cuts the longer samples, so per-sample causal attention would differ
        assert set(per_sample.config.layer_types) == {"sliding_attention"}
        with torch.no_grad():
            full = (tiny_qwen2(len(tokenizer), None)(**batch).logits - per_sample(**batch).logits).abs().max()
        assert full > 100 * TOLERANCE


def tiny_qwen2(vocab_size: int, window: int | None):
    """configs/tiny-qwen2.json, every layer with a sliding window of ``window`` tokens if given."""
    settings = json.loads((REPO / "configs" / "tiny-qwen2.json").read_text())
    settings.update(vocab_size=vocab_size, use_sliding_window=window is not None, sliding_window=window,
                    max_window_layers=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), attn_implementation="sdpa")


def test_outside_packed_rows_the_per_sample_attention_is_sdpa(tiny_llama_dir, features, tokenizer, tmp_path):
    sdpa, switched = model_from(tiny_llama_dir).eval(), model_from(tiny_llama_dir).eval()
    use_sample_attention(switched)
    padded = PaddedCollator(tokenizer.pad_token_id, padding_side="left")(features[:4])
    inputs = {key: padded[key] for key in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        assert torch.equal(sdpa(**inputs).logits, switched(**inputs).logits)
    prompt = torch.tensor([features[0]["input_ids"][:20]])
    generated = sdpa.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, switched.generate(prompt, max_new_tokens=8, do_sample=False))

    switched.save_pretrained(tmp_path)  # the choice stays in this process: config.json does not carry it
    assert SAMPLE_ATTENTION not in (tmp_path / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_only_sdpa_models_are_switched_and_peft_models_through_their_base(tiny_llama_dir):
    eager = model_from(tiny_llama_dir, "eager")
    assert not use_sample_attention(eager) and eager.config._attn_implementation == "eager"
    lora = get_peft_model(model_from(tiny_llama_dir), LoraConfig(r=4, target_modules="all-linear"))
    assert use_sample_attention(lora)
    assert lora.get_base_model().config._attn_implementation == SAMPLE_ATTENTION
    assert logits_where_trained(lora) and not logits_where_trained(lora, label_smoothing=0.1)


@pytest.mark.parametrize("packing", [True, False])
def test_logits_only_where_trained_give_the_full_loss_and_gradients(tiny_llama_dir, tokenizer, features, packing):
    collator = PackedCollator() if packing else PaddedCollator(tokenizer.pad_token_id)
    model = model_from(tiny_llama_dir)
    full = collator(features)
    reference = loss_and_grads(model, full)
    collator.trained_logits_only = True
    kept = collator(features)
    trained = int((full["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert kept["shift_labels"].shape == (trained,) and int(kept["logits_to_keep"].sum()) == trained
    assert trained < 0.8 * full["labels"].numel()  # the prompts are a real share: the test can tell
    output = model(**kept)
    assert output.logits.shape == (trained, model.config.vocab_size)
    assert_same(reference, loss_and_grads(model, kept))
    # With the Trainer's token count (gradient accumulation), the loss is the sum over that count.
    count = torch.tensor(trained * 3)
    assert abs(model(**full, num_items_in_batch=count).loss.item()
               - model(**kept, num_items_in_batch=count).loss.item()) <= TOLERANCE


class StepGradients(Trainer):
    """Keeps the gradients of the first optimizer step (the sum over its accumulated batches)."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.counts = [*getattr(self, "counts", []), int(num_items_in_batch)]
        if len(self.counts) == self.args.gradient_accumulation_steps and not hasattr(self, "grads"):
            self.grads = [p.grad.clone() for p in model.parameters()]
        return loss


def test_in_the_trainer_with_gradient_accumulation_both_give_the_same_step(tiny_llama_dir, features, tmp_path):
    def first_step(collator, switch: bool) -> StepGradients:
        model = model_from(tiny_llama_dir)
        if switch:
            prepare_sft_batches(model, collator)
        arguments = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1,
                                      gradient_accumulation_steps=2, learning_rate=1e-3, report_to="none",
                                      save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
        trainer = StepGradients(model=model, args=arguments, train_dataset=features[:6], data_collator=collator)
        trainer.train()
        return trainer

    plain, fast = first_step(PackedCollator(), switch=False), first_step(PackedCollator(), switch=True)
    assert fast.model.config._attn_implementation == SAMPLE_ATTENTION
    trained = sum(sum(label != IGNORE_INDEX for label in f["labels"][1:]) for f in features[:6])
    assert plain.counts == fast.counts == [trained, trained]  # the whole step's count, in each batch
    assert max((a - b).abs().max().item() for a, b in zip(plain.grads, fast.grads, strict=True)) <= TOLERANCE
    assert abs(plain.state.log_history[-1]["train_loss"] - fast.state.log_history[-1]["train_loss"]) <= TOLERANCE


def test_an_sft_run_turns_both_on_and_records_what_ran(tiny_llama_dir, tmp_path, shared_data):
    rows = json.loads((shared_data / "alpaca_en_demo.json").read_text())[:8]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    config = config_from_dict({
        "stage": "sft", "model_name_or_path": str(tiny_llama_dir), "dataset": [str(tmp_path / "data.json")],
        "template": "chatml", "finetuning_type": "full", "cutoff_len": 256, "overlong": "truncate",
        "output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
        "report_to": "none", "save_strategy": "no",
    })
    layers = json.loads((tiny_llama_dir / "config.json").read_text())["num_hidden_layers"]
    # each layer of each of the 2 steps: on a CPU one sdpa call per sample, on a GPU in fp32 the masked row
    kernel = {"masked_row" if torch.cuda.is_available() else "per_sample": 2 * layers}
    manifest = run(config, Console(file=io.StringIO()))
    assert manifest["data"]["train"]["speedups"] == {
        "sample_attention": True, "logits_where_trained": True, "attention_calls": kernel}
    smoothed = replace(config, training={**config.training, "label_smoothing_factor": 0.1,
                                         "output_dir": str(tmp_path / "smoothed")})
    manifest = run(smoothed, Console(file=io.StringIO()))
    assert manifest["data"]["train"]["speedups"] == {
        "sample_attention": True, "logits_where_trained": False, "attention_calls": kernel}


def flash_varlen_stand_in(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                          window_size=(-1, -1), is_causal=False, enable_gqa=False):
    """What torch's varlen flash attention computes (it needs a CUDA GPU), from its own layout:
    (length, heads, head_dim) rows, samples given by cumulative starts, causal by ``window_size``
    (or, in older torch, by ``is_causal``)."""
    assert torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k == int(cu_seq_q.diff().max())
    assert window_size == (-1, 0) or is_causal
    pieces = []
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
        q, k, v = (tensor[start:end].transpose(0, 1) for tensor in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True, enable_gqa=enable_gqa)
        pieces.append(out.transpose(0, 1))
    return torch.cat(pieces)


def test_where_calls_per_sample_do_not_pay_the_row_keeps_sdpas_mask(tiny_llama_dir, features, sdpa_calls,
                                                                      monkeypatch):
    batch = PackedCollator()(features[:6])
    reference = loss_and_grads(model_from(tiny_llama_dir), batch)
    model = model_from(tiny_llama_dir)
    use_sample_attention(model)
    monkeypatch.setattr(packing, "sample_calls_pay", lambda query: False)  # a GPU without the varlen kernel
    sdpa_calls.clear()
    packing.attention_calls.clear()
    assert_same(reference, loss_and_grads(model, batch))
    assert sdpa_calls == [(batch["input_ids"].shape[1], True, False)] * model.config.num_hidden_layers
    assert packing.attention_calls == {"masked_row": model.config.num_hidden_layers}


VARLEN_SIGNATURES = {"newer torch": {"scale", "window_size", "enable_gqa"}, "older torch": {"scale", "is_causal"}}


@pytest.fixture(params=VARLEN_SIGNATURES.values(), ids=VARLEN_SIGNATURES.keys())
def varlen_calls(request, monkeypatch) -> list[dict]:
    """Sends packed rows to ``flash_varlen_stand_in`` as if on a GPU, with the keyword arguments of
    either torch version whatever torch is installed; records each call's query dtype and
    ``enable_gqa``."""
    calls = []

    def stand_in(query, *args, **kwargs):
        calls.append({"dtype": query.dtype, "enable_gqa": kwargs.get("enable_gqa")})
        return flash_varlen_stand_in(query, *args, **kwargs)

    monkeypatch.setattr(packing, "varlen_attn", stand_in)
    monkeypatch.setattr(packing, "VARLEN_ARGUMENTS", request.param)
    monkeypatch.setattr(packing, "varlen_kernel_fits", lambda query, dropout: True)
    return calls


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_on_a_gpu_the_row_goes_to_varlen_flash_attention_in_its_layout(architecture, tiny_llama_dir, tokenizer,
                                                                        features, varlen_calls):
    def build():
        return model_from(tiny_llama_dir) if architecture == "llama" else tiny_qwen2(len(tokenizer), None)

    batch = PackedCollator()(features[:6])
    reference = loss_and_grads(build(), batch)
    model = build()
    use_sample_attention(model)
    assert_same(reference, loss_and_grads(model, batch))
    heads = model.config.num_attention_heads // model.config.num_key_value_heads
    # one call per layer for the whole row; a kernel without enable_gqa gets the key/value heads repeated
    grouped = heads > 1 if "enable_gqa" in packing.VARLEN_ARGUMENTS else None
    assert [call["enable_gqa"] for call in varlen_calls] == [grouped] * model.config.num_hidden_layers


def test_under_autocast_the_varlen_kernel_gets_the_precision_sdpa_would_use(tiny_llama_dir, features, varlen_calls):
    batch = PackedCollator()(features[:6])
    model = model_from(tiny_llama_dir)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model(**batch).loss.item()
        use_sample_attention(model)
        loss = model(**batch).loss.item()
    assert {call["dtype"] for call in varlen_calls} == {torch.bfloat16}  # rotary hands over float32 queries
    assert abs(loss - reference) <= 1e-2 * reference
