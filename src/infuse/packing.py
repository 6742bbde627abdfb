"""Packed SFT batches at the cost of their samples, not of the row they are packed into.

A packed batch is one row holding several samples, each with ``position_ids`` from 0 (see
``infuse.data.sft.PackedCollator``). Two things would make that row cost more than its samples:

- Attention. transformers' ``sdpa`` keeps the samples apart with a block-diagonal mask over the
  whole row, and the kernel computes every block of it: (n1 + n2 + ...)² instead of n1² + n2² + ...
  ``sample_attention`` runs sdpa on each sample on its own (causal, no mask), which is the same
  attention minus the blocks that the mask would zero. It is registered with transformers'
  ``AttentionInterface`` (the documented way to add an attention), with sdpa's mask, so anything
  that is not a packed training row (generation, padded batches, sliding windows) gets sdpa itself.
- The LM head. With answer-only loss most prompt positions predict nothing, yet the vocabulary
  projection and the softmax would run on every one of them. The collators can ask the model for
  logits only where the next label is trained (``logits_to_keep``), with those labels already
  shifted (``shift_labels``); ``logits_where_trained`` says whether a model takes both.

Neither changes the loss: the same positions, the same targets, the same normalisation.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SAMPLE_ATTENTION = "sdpa_per_sample"
# Attention variants sdpa cannot express without a mask: such layers go through sdpa with its mask.
_NEEDS_MASK = ("sliding_window", "softcap", "s_aux", "position_bias")


def sample_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Causal sdpa over each sample of a packed row (``cu_seq_lens_q`` gives where they start), or
    plain sdpa with ``attention_mask`` for anything else. Shapes as in transformers: ``query`` is
    (batch, heads, length, head_dim); the output is (batch, length, heads, head_dim)."""
    lengths = packed_lengths(module, query, key, kwargs)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # split/cat rather than slicing: their backward passes cost the row once, not once per sample.
    pieces = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
              for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2),
                                 strict=True)]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def packed_lengths(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict
                   ) -> list[int] | None:
    """The sample lengths of a packed causal training row, or None where per-sample attention would
    not be exactly what sdpa with the mask computes."""
    starts = kwargs.get("cu_seq_lens_q")
    if starts is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    if any(kwargs.get(name) is not None for name in _NEEDS_MASK):
        return None
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        return None
    lengths = starts.diff().tolist()
    return lengths if sum(lengths) == query.shape[2] else None


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
