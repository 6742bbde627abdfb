"""Packed SFT batches at the cost of their samples, not of the row they are packed into.

A packed batch is one row holding several samples, each with ``position_ids`` from 0 (see
``infuse.data.sft.PackedCollator``). Two things would make that row cost more than its samples:

- Attention. transformers' ``sdpa`` keeps the samples apart with a block-diagonal mask over the
  whole row, and the kernel computes every block of it: (n1 + n2 + ...)² instead of n1² + n2² + ...
  ``sample_attention`` computes each sample's causal attention on its own, which is the same
  attention minus the blocks that the mask would zero: on a GPU in half precision with one flash
  attention kernel over the whole row (``torch.nn.attention.varlen``), on a CPU with one sdpa call
  per sample (no mask); elsewhere the row keeps sdpa's mask. It is registered with transformers'
  ``AttentionInterface`` (the documented way to add an attention), with sdpa's mask, so anything
  that is not a packed training row (generation, padded batches, sliding windows) gets sdpa itself.
- The LM head. With answer-only loss most prompt positions predict nothing, yet the vocabulary
  projection and the softmax would run on every one of them. The collators can ask the model for
  logits only where the next label is trained (``logits_to_keep``), with those labels already
  shifted (``shift_labels``); ``logits_where_trained`` says whether a model takes both.

Neither changes the loss: the same positions, the same targets, the same normalisation.
"""

from __future__ import annotations

import functools
import inspect
from collections import Counter

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:  # torch 2.9 and later
    from torch.nn.attention.varlen import varlen_attn

    VARLEN_ARGUMENTS = set(inspect.signature(varlen_attn).parameters)
    if not VARLEN_ARGUMENTS & {"window_size", "is_causal"}:  # a version that cannot mask causally
        varlen_attn = None
except ImportError:
    varlen_attn, VARLEN_ARGUMENTS = None, set()

SAMPLE_ATTENTION = "sdpa_per_sample"
# Attention variants sdpa cannot express without a mask: such layers go through sdpa with its mask.
_NEEDS_MASK = ("sliding_window", "softcap", "s_aux", "position_bias")

attention_calls: Counter[str] = Counter()
"""Layer calls of ``sample_attention`` in a training run (``infuse.train.run`` clears it first), by
the kernel they ran: ``varlen`` (flash over the whole row), ``per_sample`` (sdpa per sample),
``masked_row`` (sdpa with the block mask over a packed row), ``sdpa`` (what is not a packed row).
The run manifest records them: which kernel ran depends on the device and precision, not only on
the switch."""


def sample_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Causal attention within each sample of a packed row (``cu_seq_lens_q`` gives where they
    start), or plain sdpa with ``attention_mask`` for anything else. Shapes as in transformers:
    ``query`` is (batch, heads, length, head_dim); the output is (batch, length, heads, head_dim)."""
    starts = packed_starts(module, query, key, kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if starts is not None and varlen_kernel_fits(query, dropout):
        attention_calls["varlen"] += 1
        return varlen_rows(query, key, value, starts, kwargs.get("max_length_q"), scaling, groups), None
    if starts is None or not sample_calls_pay(query):
        attention_calls["sdpa" if starts is None else "masked_row"] += 1
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    attention_calls["per_sample"] += 1
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    lengths = host_lengths(starts)
    # split/cat rather than slicing: their backward passes cost the row once, not once per sample.
    pieces = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
              for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2),
                                 strict=True)]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def packed_starts(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict
                  ) -> torch.Tensor | None:
    """Where the samples of a packed causal training row start (and where it ends), or None where
    per-sample attention would not be exactly what sdpa with the mask computes."""
    starts = kwargs.get("cu_seq_lens_q")
    if starts is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    if any(kwargs.get(name) is not None for name in _NEEDS_MASK):
        return None
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        return None
    return starts if sum(host_lengths(starts)) == query.shape[2] else None


_last_lengths: tuple[torch.Tensor | None, list[int]] = (None, [])


def host_lengths(starts: torch.Tensor) -> list[int]:
    """The sample lengths as Python ints. Every layer of a forward pass gets the same ``starts``
    tensor; reading it once per pass, not once per layer, keeps a GPU from waiting at each layer."""
    global _last_lengths
    if _last_lengths[0] is not starts:
        _last_lengths = (starts, starts.diff().tolist())
    return _last_lengths[1]


def varlen_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, starts: torch.Tensor,
                longest: int | None, scaling: float | None, groups: int) -> torch.Tensor:
    """Causal flash attention over every sample of the row in one kernel, in and out in
    transformers' layouts. Newer torch versions take ``window_size`` for causality and group
    key/value heads themselves; older ones take ``is_causal``, and the keys and values are repeated."""
    longest = longest or max(host_lengths(starts))
    options = {"scale": scaling}
    options.update({"window_size": (-1, 0)} if "window_size" in VARLEN_ARGUMENTS else {"is_causal": True})
    if "enable_gqa" in VARLEN_ARGUMENTS:
        options["enable_gqa"] = groups > 1
    else:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # (length, heads, head_dim) rows, in the precision sdpa would use under autocast
    rows = [tensor[0].transpose(0, 1).to(attention_dtype(query)) for tensor in (query, key, value)]
    return varlen_attn(*rows, starts, starts, longest, longest, **options).unsqueeze(0)


def varlen_kernel_fits(query: torch.Tensor, dropout: float) -> bool:
    """Whether torch's flash attention over variable-length samples can run this layer: a CUDA
    device of compute capability 8.0 or newer, half precision, head size up to 256, no dropout
    (the kernel has none)."""
    return (varlen_attn is not None and query.is_cuda and attention_dtype(query) in (torch.float16, torch.bfloat16)
            and query.shape[-1] <= 256 and not dropout and flash_capable(query.device.index))


def sample_calls_pay(query: torch.Tensor) -> bool:
    """Whether one sdpa call per sample beats one masked call over the row: on a CPU, where the
    skipped blocks are time. On a GPU the row's blocks run in parallel, and the calls cost more in
    launches (and, in half precision, in kernel setup for every new length) than the blocks save;
    on an H200 they were slower (README, Benchmarks)."""
    return query.device.type == "cpu"


def attention_dtype(query: torch.Tensor) -> torch.dtype:
    """The precision attention runs in. Under autocast (``bf16``/``fp16`` training) the rotary
    embedding leaves the queries in float32, and sdpa casts them to autocast's type."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


@functools.cache
def flash_capable(device_index: int | None) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def use_sample_attention(model) -> bool:
    """Switch a model (or the base of a PEFT model) that runs sdpa to ``sample_attention``; True if
    it did. Models on eager or flash attention keep theirs (flash attention is already per sample).
    The choice is not saved: transformers leaves the attention implementation out of config.json."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(SAMPLE_ATTENTION, sample_attention)
    AttentionMaskInterface.register(SAMPLE_ATTENTION, sdpa_mask)
    base.set_attn_implementation(SAMPLE_ATTENTION)
    return base.config._attn_implementation == SAMPLE_ATTENTION


def logits_where_trained(model, label_smoothing: float = 0.0) -> bool:
    """Whether ``model`` computes its loss from logits only at trained positions when a batch says
    which (``logits_to_keep``, a boolean mask) and what they predict (``shift_labels``): its forward
    takes ``logits_to_keep`` and it uses transformers' causal LM loss, which reads ``shift_labels``.
    Label smoothing (the Trainer computes it from all logits) rules it out."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    builtin = type(base).__module__.startswith("transformers.models.")  # remote code may compute its own loss
    takes_mask = "logits_to_keep" in inspect.signature(base.forward).parameters
    causal_loss = LOSS_MAPPING.get(getattr(base, "loss_type", None)) is ForCausalLMLoss
    custom_loss = hasattr(base, "_loss_function")
    return builtin and takes_mask and causal_loss and not custom_loss and not label_smoothing


def prepare_sft_batches(model, collator, label_smoothing: float = 0.0) -> dict[str, bool]:
    """Turn on what ``model`` supports for ``collator``'s batches: attention per sample for packed
    rows, logits only where trained for packed or padded ones. Returns what was turned on (for the
    run manifest); a collator of another kind is left as it is."""
    from infuse.data.sft import PackedCollator, PaddedCollator

    if not isinstance(collator, PackedCollator | PaddedCollator):
        return {"sample_attention": False, "logits_where_trained": False}
    collator.trained_logits_only = logits_where_trained(model, label_smoothing)
    packed = isinstance(collator, PackedCollator)
    return {"sample_attention": packed and use_sample_attention(model),
            "logits_where_trained": collator.trained_logits_only}
