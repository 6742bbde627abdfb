"""Chat templates by name: the tokenizer's own, the built-ins, and the one saved with the model."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from infuse.data.templates import apply_template, chat_inputs, end_of_turn, render, resolve_template
from infuse.errors import InfuseError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi "},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": '{"name": "weather"}'},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "content": "Sunny."},
]
TOOLS = [{"name": "weather", "description": "Today's weather", "parameters": {}}]


@pytest.fixture
def fresh_tokenizer(tokenizer_dir):
    """A tokenizer of its own for tests that change it."""
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def test_llama2_renders_the_llama2_chat_form(tokenizer):
    text = render(tokenizer, resolve_template(tokenizer, "llama2"), CONVERSATION[:5])
    assert text == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s>"
        '<s>[INST] Weather? [/INST] {"name": "weather"} </s>'
    )


def test_llama2_folds_tool_results_and_descriptions_into_user_and_system_turns(tokenizer):
    text = render(tokenizer, resolve_template(tokenizer, "llama2"), CONVERSATION, TOOLS)
    assert "<s>[INST] Function result: sunny [/INST] Sunny. </s>" in text
    assert text.startswith("<s>[INST] <<SYS>>\nBe brief.\n\nYou may call these functions.")
    assert '\n{"name": "weather", "description": "Today\'s weather", "parameters": {}}\n<</SYS>>' in text


def test_tool_calls_are_text_only_for_templates_without_a_place_for_them(tokenizer):
    call = {"type": "function", "function": {"name": "weather", "arguments": {"day": "today"}}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    tools = [{"type": "function", "function": TOOLS[0]}]
    written, rendered_tools = chat_inputs(messages, tools, resolve_template(tokenizer, "chatml"))
    assert written[1] == {"role": "assistant", "content": '{"name": "weather", "arguments": {"day": "today"}}'}
    assert rendered_tools == tools  # chatml writes them into its system turn itself
    native = "{% for m in messages %}{{ m.tool_calls | tojson }}{% endfor %}{{ tools | tojson }}"
    assert chat_inputs(messages, tools, native) == (messages, tools)  # e.g. Qwen2.5's: <tool_call> tags
    plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
    folded, none = chat_inputs(messages, tools, plain)
    assert none is None and folded[0]["role"] == "system" and "You may call these functions" in folded[0]["content"]
    two = [{"role": "assistant", "content": "Checking.", "tool_calls": [call, call]}]
    assert chat_inputs(two, None, plain)[0][0]["content"] == "Checking.\n" + json.dumps([call["function"]] * 2)


def test_llama2_refuses_turns_that_do_not_alternate(tokenizer):
    two_users = [{"role": "user", "content": "A"}, {"role": "user", "content": "B"}]
    with pytest.raises(InfuseError, match="alternate user"):
        render(tokenizer, resolve_template(tokenizer, "llama2"), two_users)


def test_chatml_renders_tool_turns_and_tools_in_the_system_turn(tokenizer):
    text = render(tokenizer, resolve_template(tokenizer, "chatml"), CONVERSATION, TOOLS)
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou may call these functions.")
    tools = '<tools>\n{"name": "weather", "description": "Today\'s weather", "parameters": {}}\n</tools>'
    assert tools + "<|im_end|>\n" in text
    assert text.endswith("<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\nSunny.<|im_end|>\n")
    chatml = resolve_template(tokenizer, "chatml")
    prompt = render(tokenizer, chatml, CONVERSATION[:2], add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_auto_is_the_tokenizers_own_and_needs_one(fresh_tokenizer):
    own = fresh_tokenizer.chat_template
    assert own and resolve_template(fresh_tokenizer, "auto") == own
    fresh_tokenizer.chat_template = None
    with pytest.raises(InfuseError, match="no chat template .*template: chatml.*template: llama2"):
        resolve_template(fresh_tokenizer, "auto")
    with pytest.raises(InfuseError, match="'vicuna' is not known"):
        resolve_template(fresh_tokenizer, "vicuna")


def test_the_applied_template_is_saved_with_the_tokenizer(fresh_tokenizer, tmp_path):
    template = apply_template(fresh_tokenizer, "llama2")
    fresh_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.chat_template == template == resolve_template(reloaded, "llama2")
    prompt = reloaded.apply_chat_template(CONVERSATION[1:2], tokenize=False)
    assert prompt == "<s>[INST] Hi [/INST]"


def test_a_template_file_can_be_named(fresh_tokenizer, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}")
    assert apply_template(fresh_tokenizer, str(path)) == path.read_text()
    with pytest.raises(InfuseError, match="template: .*other.jinja: no such file"):
        apply_template(fresh_tokenizer, str(tmp_path / "other.jinja"))


def test_end_of_turn_is_found_and_its_absence_refused(tokenizer):
    assert end_of_turn(tokenizer, resolve_template(tokenizer, "chatml")) == "<|im_end|>"
    assert end_of_turn(tokenizer, resolve_template(tokenizer, "llama2")) == "</s>"
    never_stops = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(InfuseError, match="never learn to stop"):
        end_of_turn(tokenizer, never_stops)
