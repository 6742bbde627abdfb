"""SFT samples: only assistant answers and their end-of-turn are trained, for any template; packed
batches give each sample the loss it has alone; long, empty and bad samples are counted or refused."""

from __future__ import annotations

import io
import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from infuse.config import TrainConfig
from infuse.data.formats import Conversation, load_conversations
from infuse.data.sft import (
    IGNORE_INDEX,
    LossScope,
    PackedCollator,
    PaddedCollator,
    build_sft_data,
    build_sft_dataset,
    render_sample,
    tokenize_conversation,
)
from infuse.data.templates import apply_template, chat_inputs, render, resolve_template
from infuse.errors import InfuseError

# A Llama-3-style template of the kind a tokenizer ships: headers and <|eot_id|> are special tokens.
LLAMA3_LIKE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# A template whose generation prompt is not the header stored answers get (it opens an empty
# thinking block), so the answer has to be found after the earlier turns instead.
THINKING = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{% endif %}"
)
# What each template must train for an assistant message: the words and the end-of-turn marker.
EXPECTED = {
    "chatml": lambda content: content + "<|im_end|>",
    "llama2": lambda content: " " + content.strip() + " </s>",
    "llama3-like": lambda content: content.strip() + "<|eot_id|>",
    "thinking": lambda content: content + "<|im_end|>",
}


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer_dir):
    """The test tokenizer with Llama-3 header tokens added, so it can carry a template of its own."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    return tokenizer


@pytest.fixture(scope="module")
def sample_conversations(shared_data) -> list[Conversation]:
    alpaca, _ = load_conversations([shared_data / "alpaca_en_demo.json"])
    identity = identity_conversations(shared_data)
    glaive, _ = load_conversations([shared_data / "glaive_toolcall_en_demo.json"])
    conversations = alpaca[:25] + identity[:10] + glaive[:12]
    assert sum(bool(c.tools) for c in conversations) >= 5
    return conversations


def identity_conversations(shared_data) -> list[Conversation]:
    names = {"name": "A", "author": "B"}
    return load_conversations([shared_data / "identity.json"], placeholders=names)[0]


def chat(question: str, answer: str, where: str = "") -> Conversation:
    return Conversation([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                        where=where)


def template_text(tokenizer, name: str) -> str:
    return {"llama3-like": LLAMA3_LIKE, "thinking": THINKING}.get(name) or resolve_template(tokenizer, name)


def trained_runs(input_ids: list[int], labels: list[int], tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs = []
    pairs = zip(input_ids, labels, strict=True)
    for trained, group in itertools.groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX):
        pairs = list(group)
        if trained:
            assert all(token == label for token, label in pairs)
            runs.append(tokenizer.decode([token for token, _ in pairs]))
    return runs


@pytest.mark.parametrize("name", list(EXPECTED))
def test_exactly_the_answers_and_their_end_of_turn_are_trained(chat_tokenizer, sample_conversations, name):
    template = template_text(chat_tokenizer, name)
    with_tools = 0
    for conversation in sample_conversations:
        input_ids, labels = tokenize_conversation(conversation, chat_tokenizer, template)
        # Tool calls as text where the template has no place for them; tools it ignores go into the system turn.
        messages, tools = chat_inputs(conversation.messages, conversation.tools, template)
        assert chat_tokenizer.decode(input_ids) == render(chat_tokenizer, template, messages, tools)
        if not tools and conversation.tools:
            assert "You may call these functions" in chat_tokenizer.decode(input_ids)
            with_tools += 1
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert trained_runs(input_ids, labels, chat_tokenizer) == [EXPECTED[name](a) for a in answers], \
            conversation.where
    folded = 0 if name in ("chatml", "llama2") else sum(bool(c.tools) for c in sample_conversations)
    assert with_tools == folded


def test_a_template_that_drops_earlier_reasoning_trains_the_last_answer_with_mask_history(tokenizer):
    """Like Qwen3's: an earlier answer loses its <think> block once another answer follows it."""
    drops_reasoning = (
        "{%- for m in messages -%}{%- set c = m['content'] -%}"
        "{%- if m['role'] == 'assistant' and not loop.last -%}{%- set c = c.split('</think>')[-1] -%}{%- endif -%}"
        "{{- '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}")
    conversation = Conversation([{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "<think>greet</think>Yo"},
                                 {"role": "user", "content": "Bye"},
                                 {"role": "assistant", "content": "<think>part</think>Ciao"}])
    with pytest.raises(InfuseError, match="rewrites earlier turns"):
        tokenize_conversation(conversation, tokenizer, drops_reasoning)
    input_ids, labels = tokenize_conversation(conversation, tokenizer, drops_reasoning, LossScope(mask_history=True))
    assert trained_runs(input_ids, labels, tokenizer) == ["<think>part</think>Ciao<|im_end|>"]
    assert "<think>greet</think>" not in tokenizer.decode(input_ids)


def test_chatml_role_headers_are_masked(tokenizer):
    conversation = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    input_ids, labels = tokenize_conversation(conversation, tokenizer, resolve_template(tokenizer, "chatml"))
    pieces = render_sample(input_ids, labels, tokenizer)
    assert pieces == [("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
                      ("Yo<|im_end|>", True), ("\n", False)]


def test_loss_scope_trains_the_last_answer_only_or_the_prompts_too(tokenizer):
    conversation = Conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Bye"},
                                 {"role": "assistant", "content": "Ciao"}])
    template = resolve_template(tokenizer, "chatml")
    first_turns = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    last_prompt = "\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    expected = {
        LossScope(): ["Yo<|im_end|>", "Ciao<|im_end|>"],
        LossScope(mask_history=True): ["Ciao<|im_end|>"],
        LossScope(train_on_prompt=True): [f"{first_turns}Yo<|im_end|>{last_prompt}Ciao<|im_end|>"],
        LossScope(train_on_prompt=True, mask_history=True): [f"{last_prompt}Ciao<|im_end|>"],
    }
    for scope, runs in expected.items():
        input_ids, labels = tokenize_conversation(conversation, tokenizer, template, scope)
        assert trained_runs(input_ids, labels, tokenizer) == runs, scope
        assert tokenizer.decode(input_ids) == first_turns + f"Yo<|im_end|>{last_prompt}Ciao<|im_end|>\n"


def test_text_in_a_template_trains_the_answers_and_plain_text_trains_everything(tokenizer, tmp_path):
    rows = [{"text": "<s>[INST] What is 2+2? [/INST] Four. </s><s>[INST] And 3+3? [/INST] Six. </s>"},
            {"text": "Plain text to continue."},
            {"text": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
                     "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nCiao.<|im_end|>\n"}]
    path = tmp_path / "guanaco.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (inst, plain, chatml), stats = load_conversations([path])
    input_ids, labels = tokenize_conversation(chatml, tokenizer, resolve_template(tokenizer, "chatml"))
    assert trained_runs(input_ids, labels, tokenizer) == ["Hello.<|im_end|>", "Ciao.<|im_end|>"]
    assert stats.formats == {str(path): "text"}
    input_ids, labels = tokenize_conversation(inst, tokenizer, resolve_template(tokenizer, "chatml"))
    assert trained_runs(input_ids, labels, tokenizer) == [" Four. </s>", " Six. </s>"]
    assert input_ids[0] == tokenizer.bos_token_id and tokenizer.decode(input_ids) == rows[0]["text"]
    input_ids, labels = tokenize_conversation(plain, tokenizer, resolve_template(tokenizer, "chatml"))
    assert labels == input_ids


def test_with_pad_equal_to_eos_the_final_eos_is_trained_and_padding_is_not(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.pad_token = tokenizer.eos_token
    eos = tokenizer.eos_token_id
    template = resolve_template(tokenizer, "llama2")
    short = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    long = Conversation([{"role": "user", "content": "Tell me more about it"},
                         {"role": "assistant", "content": "There is much more to say about it."}])
    features = [dict(zip(("input_ids", "labels"), tokenize_conversation(c, tokenizer, template), strict=True))
                for c in (short, long)]
    batch = PaddedCollator(tokenizer.pad_token_id)(features)
    length = len(features[0]["input_ids"])
    assert batch["input_ids"].shape[1] > length
    assert batch["labels"][0, length - 1] == eos and batch["input_ids"][0, length - 1] == eos
    assert (batch["input_ids"][0, length:] == eos).all()
    assert (batch["labels"][0, length:] == IGNORE_INDEX).all()
    assert batch["attention_mask"][0].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
    packed = PackedCollator()(features)
    ends = torch.tensor([length - 1, length + len(features[1]["input_ids"]) - 1])
    assert (packed["labels"][0, ends] == eos).all()


def sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token losses of one row of logits (token t predicts label t + 1); -100 gives 0."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=IGNORE_INDEX, reduction="none")


def mean_loss(losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return losses.sum() / (labels[1:] != IGNORE_INDEX).sum()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_and_padded_losses_equal_each_sample_alone(tiny_llama_dir, shared_data, attention):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation=attention).eval()
    conversations = identity_conversations(shared_data)
    dataset, _ = build_sft_dataset(conversations[:6], tokenizer, resolve_template(tokenizer, "chatml"), 96,
                                   overlong="truncate")
    features = [dataset[i] for i in range(len(dataset))]
    lengths = [len(f["input_ids"]) for f in features]
    assert len(set(lengths)) >= 4

    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([f["input_ids"]])).logits[0] for f in features]
        labels = [torch.tensor(f["labels"]) for f in features]
        alone_losses = [sample_losses(lg, lb) for lg, lb in zip(alone, labels, strict=True)]
        alone_means = torch.stack([mean_loss(lo, lb) for lo, lb in zip(alone_losses, labels, strict=True)])

        packed = PackedCollator()(features)
        assert "attention_mask" not in packed and packed["input_ids"].shape == (1, sum(lengths))
        starts = torch.tensor([0, *itertools.accumulate(lengths)][:-1])
        assert (packed["position_ids"][0, starts] == 0).all()
        assert (packed["labels"][0, starts] == IGNORE_INDEX).all()
        output = model(**packed)
        row = sample_losses(output.logits[0], packed["labels"][0])
        packed_means = torch.stack([mean_loss(row[s:s + n - 1], packed["labels"][0, s:s + n])
                                    for s, n in zip(starts.tolist(), lengths, strict=True)])
        everything = torch.cat(alone_losses).sum() / sum((lb[1:] != IGNORE_INDEX).sum() for lb in labels)

        padded = PaddedCollator(tokenizer.pad_token_id)(features)
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        padded_means = torch.stack([mean_loss(sample_losses(lg, lb), lb)
                                    for lg, lb in zip(logits, padded["labels"], strict=True)])

    assert (packed_means - alone_means).abs().max() <= 1e-4
    assert (padded_means - alone_means).abs().max() <= 1e-4
    assert abs(output.loss - everything) <= 1e-4
    assert alone_means.std() > 0.01  # the samples really differ, so equal losses mean something


def lengths_of(conversations, tokenizer, template) -> list[int]:
    return [len(tokenize_conversation(c, tokenizer, template)[0]) for c in conversations]


def test_overlong_samples_are_truncated_dropped_or_refused_and_counted(tokenizer, shared_data):
    conversations = identity_conversations(shared_data)[:30]
    template = resolve_template(tokenizer, "chatml")
    lengths = lengths_of(conversations, tokenizer, template)
    cutoff = sorted(lengths)[20]
    overlong = sum(length > cutoff for length in lengths)
    assert overlong >= 3

    dataset, stats = build_sft_dataset(conversations, tokenizer, template, cutoff, overlong="drop")
    assert stats.dropped == {"overlong": overlong} and len(dataset) == stats.samples == 30 - overlong
    assert stats.tokens == sum(length for length in lengths if length <= cutoff)

    dataset, stats = build_sft_dataset(conversations, tokenizer, template, cutoff, overlong="truncate")
    assert stats.truncated == overlong and len(dataset) == 30 and stats.longest == cutoff
    first_long = lengths.index(max(lengths))
    full_ids, _ = tokenize_conversation(conversations[first_long], tokenizer, template)
    assert dataset[first_long]["input_ids"] == full_ids[:cutoff]

    with pytest.raises(InfuseError) as error:
        build_sft_dataset(conversations, tokenizer, template, cutoff, overlong="error")
    message = str(error.value)
    where = conversations[next(i for i, n in enumerate(lengths) if n > cutoff)].where
    assert f"{overlong} sample(s) are longer than cutoff_len {cutoff}" in message and where in message
    assert f"the longest has {max(lengths)} tokens" in message


def test_a_sample_left_with_nothing_to_train_is_dropped_and_counted(tokenizer):
    template = resolve_template(tokenizer, "chatml")
    long_question = chat("word " * 60, "Yes.", "q.jsonl:1")
    short = chat("Hi", "Hello.", "q.jsonl:2")
    dataset, stats = build_sft_dataset([long_question, short], tokenizer, template, 24, overlong="truncate")
    assert len(dataset) == 1 and stats.truncated == 1
    assert stats.dropped == {"nothing_trained_after_truncation": 1}
    with pytest.raises(InfuseError, match="No SFT sample is left"):
        build_sft_dataset([long_question], tokenizer, template, 24, overlong="truncate")


def test_rows_with_nothing_to_train_or_that_the_template_refuses_are_bad_rows(tokenizer):
    llama2 = resolve_template(tokenizer, "llama2")
    unanswered = Conversation(text="<s>[INST] Q [/INST] </s>", where="t.jsonl:1")
    two_users = Conversation([{"role": "user", "content": "A"}, {"role": "user", "content": "B"},
                              {"role": "assistant", "content": "C"}], where="m.jsonl:7")
    good = chat("Hi", "Hello.")
    with pytest.raises(InfuseError, match=r"t.jsonl:1: no token of this sample would be trained"):
        build_sft_dataset([unanswered, good], tokenizer, llama2, 64)
    with pytest.raises(InfuseError, match=r"m.jsonl:7: the chat template cannot render .*alternate"):
        build_sft_dataset([two_users, good], tokenizer, llama2, 64)
    dataset, stats = build_sft_dataset([unanswered, two_users, good], tokenizer, llama2, 64, bad_rows="skip")
    assert len(dataset) == 1 and stats.skipped == {"nothing_trained": 1, "template": 1}
    assert stats.to_dict()["skipped_rows"] == 2


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    counts_turns = ("{{ 'Turns: ' + (messages | length | string) + '\n' }}{% for m in messages %}"
                    "{{ m['role'] + ': ' + m['content'] + eos_token + '\n' }}{% endfor %}")
    conversation = Conversation([{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                                 {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}])
    with pytest.raises(InfuseError, match="renders the conversation up to message 1 differently"):
        tokenize_conversation(conversation, tokenizer, counts_turns)
    conversation.where = "p.jsonl:3"
    with pytest.raises(InfuseError, match="^p.jsonl:3: the chat template renders"):  # not a bad row: no skip
        build_sft_dataset([conversation], tokenizer, counts_turns, 64, bad_rows="skip")


def test_render_sample_shows_trained_and_masked_text(tokenizer, shared_data):
    conversations, _ = load_conversations([shared_data / "glaive_toolcall_en_demo.json"])
    chatml = resolve_template(tokenizer, "chatml")
    input_ids, labels = tokenize_conversation(conversations[0], tokenizer, chatml)
    pieces = render_sample(input_ids, labels, tokenizer)
    assert "".join(text for text, _ in pieces) == tokenizer.decode(input_ids)
    assert [text for text, trained in pieces if trained] == trained_runs(input_ids, labels, tokenizer)
    assert [trained for _, trained in pieces][:2] == [False, True]


def test_build_sft_data_sets_the_template_and_reports_counts(tokenizer_dir, shared_data, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = None
    identity = str(shared_data / "identity.json")
    config = TrainConfig(stage="sft", model_name_or_path="unused", dataset=[identity], template="llama2",
                         cutoff_len=64, overlong="drop", placeholders={"name": "Ada"},
                         training={"output_dir": str(tmp_path / "run")})
    out = io.StringIO()
    data = build_sft_data(config, tokenizer, Console(file=out, width=200))
    assert tokenizer.chat_template == resolve_template(tokenizer, "llama2")
    stats = data.stats["train"]
    assert stats["rows"] == 91 and stats["samples"] + stats["dropped_by_reason"]["overlong"] == 91
    assert stats["unfilled_placeholders"]["author"] > 0 and stats["end_of_turn"] == "</s>"
    assert isinstance(data.collator, PackedCollator) and len(data.dataset) == stats["samples"]
    printed = out.getvalue()
    assert "SFT data: 91 rows (alpaca)" in printed and "Dropped samples: " in printed
    assert f"Placeholders left unfilled: author {stats['unfilled_placeholders']['author']}" in printed
    tokenizer.save_pretrained(tmp_path / "tok")
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").chat_template == tokenizer.chat_template

    unpacked = build_sft_data(replace(config, packing=False), tokenizer, Console(file=io.StringIO()))
    assert isinstance(unpacked.collator, PaddedCollator)
    assert unpacked.fingerprint == data.fingerprint  # same samples, whatever the batching
    prompts_too = build_sft_data(replace(config, train_on_prompt=True), tokenizer, Console(file=io.StringIO()))
    assert prompts_too.fingerprint != data.fingerprint  # other labels: a run of them is not resumed from these
    assert prompts_too.stats["train"]["trained_tokens"] > stats["trained_tokens"]


def test_apply_template_then_tokenize_uses_the_saved_template(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = apply_template(tokenizer, "llama2")
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(Path(tmp_path))
    conversation = chat("Hi", "Hello.")
    ids, _ = tokenize_conversation(conversation, reloaded, resolve_template(reloaded, "auto"))
    assert ids == tokenize_conversation(conversation, tokenizer, template)[0]
    prompt = reloaded.apply_chat_template(conversation.messages[:1], tokenize=False)
    assert reloaded.decode(ids).startswith(prompt)


@pytest.mark.parametrize("packing", [True, False])
def test_trained_logits_only_keep_every_trained_label_in_order(tokenizer, shared_data, packing):
    conversations = identity_conversations(shared_data)[:5]
    dataset, _ = build_sft_dataset(conversations, tokenizer, resolve_template(tokenizer, "chatml"), 96)
    features = [dataset[i] for i in range(len(dataset))]
    collator = PackedCollator(trained_logits_only=True) if packing else \
        PaddedCollator(tokenizer.pad_token_id, trained_logits_only=True)
    batch = collator(features)
    expected = [label for f in features for label in f["labels"][1:] if label != IGNORE_INDEX]
    assert batch["shift_labels"].tolist() == expected
    # Each kept position is the one just before its label, and holds the token that precedes it.
    rows, columns = batch["logits_to_keep"].nonzero(as_tuple=True)
    assert (batch["labels"][rows, columns + 1] == batch["shift_labels"]).all()
    assert batch["logits_to_keep"].shape == batch["input_ids"].shape and not batch["logits_to_keep"][:, -1].any()
    if packing:  # where each sample starts, for attention within each sample
        lengths = [len(f["input_ids"]) for f in features]
        assert batch["cu_seq_lens_q"].tolist() == [0, *itertools.accumulate(lengths)]


def test_tokenizing_into_a_log_file_leaves_no_trace_of_the_bar(tokenizer, shared_data):
    console = Console(file=io.StringIO())  # not a terminal: a transient bar would leave a blank line
    build_sft_dataset(identity_conversations(shared_data)[:3], tokenizer, resolve_template(tokenizer, "chatml"), 96,
                      console=console)
    assert console.file.getvalue() == ""


def test_the_run_counts_rows_skipped_while_reading_and_while_tokenizing(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)  # its own: the run sets the template on it
    path = tmp_path / "data.jsonl"
    two_users = {"messages": [{"role": "user", "content": "A"}, {"role": "user", "content": "B"},
                              {"role": "assistant", "content": "C"}]}  # llama2 cannot render it
    path.write_text(json.dumps({"instruction": "Q", "output": "A"}) + "\nnot json\n" + json.dumps(two_users) + "\n")
    config = TrainConfig(stage="sft", model_name_or_path="unused", dataset=[str(path)], template="llama2",
                         bad_rows="skip", training={"output_dir": str(tmp_path / "run")})
    stats = build_sft_data(config, tokenizer, Console(file=io.StringIO())).stats["train"]
    assert stats["skipped_rows"] == 2 and stats["skipped_by_reason"] == {"not_json": 1, "template": 1}
    assert [example.split(": ")[0] for example in stats["skipped_examples"]] == [f"{path}:2", f"{path}:3"]
