"""``infuse chat``: a conversation read from piped stdin, each reply the model's own greedy answer
to the whole conversation so far in its chat template."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from infuse.chat import chat
from infuse.errors import InfuseError


def greedy_reply(model_dir, history: list[dict[str, str]], max_new_tokens: int) -> str:
    """What model.generate answers to ``history``, stopping at eos or the template's <|im_end|>."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)["input_ids"]
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=stops)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_chat_keeps_the_history_streams_replies_and_resets(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand then?\n/reset\n/rest\nhello\n/quit\nnever read\n"))
    out = io.StringIO()
    history = chat(str(tiny_llama_dir), Console(file=out, width=10_000), system="Be brief.",
                   max_new_tokens=12, temperature=0)
    system = {"role": "system", "content": "Be brief."}
    first = greedy_reply(tiny_llama_dir, [system, {"role": "user", "content": "hello"}], 12)
    second = greedy_reply(tiny_llama_dir, [system, {"role": "user", "content": "hello"},
                                           {"role": "assistant", "content": first},
                                           {"role": "user", "content": "and then?"}], 12)
    # After /reset the conversation starts again from the system prompt, so "hello" gets the first answer;
    # the mistyped /rest is not sent, and /quit leaves before "never read".
    assert history == [system, {"role": "user", "content": "hello"}, {"role": "assistant", "content": first}]
    printed = out.getvalue()
    assert first.strip() and second.strip() and first != second
    assert printed.count(first) >= 2 and second in printed and "Conversation forgotten." in printed
    assert "No command /rest: /reset forgets the conversation, /exit leaves." in printed


def test_chat_refuses_a_model_without_a_chat_template(tiny_llama_dir, tmp_path):
    model_dir = tmp_path / "plain"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(model_dir)
    with pytest.raises(InfuseError, match="no chat template"):
        chat(str(model_dir), Console(file=io.StringIO()))


def test_infuse_chat_command_reads_piped_stdin(tiny_llama_dir):
    command = [sys.executable, "-m", "infuse.cli", "chat", str(tiny_llama_dir), "--temperature", "0",
               "--max-new-tokens", "8"]
    done = subprocess.run(command, input="hello\n/exit\nnever read\n", capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    expected = greedy_reply(tiny_llama_dir, [{"role": "user", "content": "hello"}], 8)
    assert expected.strip() and expected in done.stdout
    assert done.stdout.count("you>") == 2  # the prompt before "hello" and before "/exit"
