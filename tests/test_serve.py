"""The HTTP server on a random loopback port: two tiny models and one adapter on the first.

Every generation the server makes is compared token for token with ``model.generate`` of the
same model (and adapter) loaded locally; one server, with an API key, answers all tests but the
overload one.
"""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from conftest import random_lora_adapter
from openai import OpenAI
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from infuse.data.formats import chat_request
from infuse.data.templates import chat_inputs, render
from infuse.errors import InfuseError
from infuse.serve import ServeOptions, start_server
from infuse.serve.openai_api import tool_calls_in
from infuse.serve.registry import check_safetensors, end_of_turn_ids, parse_model_specs
from infuse.serve.vllm import run_vllm, vllm_command

# peft reads a renamed transformers attribute when the reference adapter is loaded; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

KEY = "test-key"
SEED_PAYLOAD = {"inputs": "Amazon EC2 P5 instances are equipped with GPUs of the type",
                "parameters": {"max_new_tokens": 200, "top_p": 0.9, "temperature": 0.01,
                               "return_full_text": False}}
PROMPTS = ["The history of", "Anarchism is a political philosophy that", "In 1999 the company", "A",
           "Question: what is the capital of France? Answer:", "def main():\n    return"]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A LoRA adapter on the tiny Llama, its lora_B made nonzero so that it changes the output."""
    return random_lora_adapter(tiny_llama_dir, tmp_path_factory.mktemp("adapter"), seed=1, spread=0.5,
                               r=4, lora_alpha=8, target_modules="all-linear")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, tiny_llama_config_path, tokenizer) -> Path:
    """A second tiny model of another architecture (Qwen2) with the same tokenizer."""
    spec = json.loads(tiny_llama_config_path.read_text())
    sizes = {k: v for k, v in spec.items() if k not in ("model_type", "architectures")}
    config = AutoConfig.for_model("qwen2", **sizes)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(2)
    out = tmp_path_factory.mktemp("qwen")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapter_dir, qwen_dir):
    with start_server({"base": str(tiny_llama_dir), "infused": f"{tiny_llama_dir}+{adapter_dir}",
                       "qwen": str(qwen_dir)}, api_key=KEY, max_new_tokens=256, max_input_tokens=300,
                      max_body_bytes=100_000) as handle:
        yield handle


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


class Local:
    """A model and its tokenizer loaded the ordinary way, for reference generations."""

    def __init__(self, model, folder: Path):
        self.model = model.eval()
        # From the model's own dir, as a user would: for a qwen2 config, AutoTokenizer picks
        # Qwen2Tokenizer, which splits digits differently from the tokenizer it was saved from.
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def ids(self, prompt: str | list[int], max_new_tokens: int, eos: list[int] | None = None) -> list[int]:
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        with torch.no_grad():
            out = self.model.generate(torch.tensor([prompt_ids]), do_sample=False,
                                      max_new_tokens=max_new_tokens,
                                      eos_token_id=eos or self.tokenizer.eos_token_id,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return out[0, len(prompt_ids):].tolist()

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def local(tiny_llama_dir, adapter_dir, qwen_dir) -> dict[str, Local]:
    infused = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), adapter_dir)
    return {"base": Local(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tiny_llama_dir),
            "infused": Local(infused, tiny_llama_dir),
            "qwen": Local(AutoModelForCausalLM.from_pretrained(qwen_dir), qwen_dir)}


def generate(http, inputs: str, **parameters) -> dict:
    response = http.post("/generate", json={"inputs": inputs, "parameters": {"details": True, **parameters}})
    assert response.status_code == 200, response.text
    return response.json()


def token_ids(reply: dict) -> list[int]:
    return [token["id"] for token in reply["details"]["tokens"]]


# ---------------------------------------------------------------- TGI routes


def test_seed_payload_on_generate_and_invocations_is_greedy_and_token_identical(http, local):
    reply = http.post("/generate", json=SEED_PAYLOAD)
    wrapped = http.post("/invocations", json=SEED_PAYLOAD)
    assert reply.status_code == wrapped.status_code == 200
    expected = local["base"].ids(SEED_PAYLOAD["inputs"], 200)
    text = local["base"].text(expected)
    assert reply.json() == {"generated_text": text}
    assert wrapped.json() == [{"generated_text": text}]
    detailed = generate(http, SEED_PAYLOAD["inputs"], **SEED_PAYLOAD["parameters"])
    assert token_ids(detailed) == expected and detailed["details"]["generated_tokens"] == len(expected)


def test_adapter_changes_the_output_exactly_as_loading_it_locally(http, local):
    prompt = PROMPTS[1]
    by_adapter_id = generate(http, prompt, max_new_tokens=40, adapter_id="infused")
    by_model = http.post("/generate", json={"inputs": prompt, "model": "infused",
                                            "parameters": {"max_new_tokens": 40, "details": True}}).json()
    base = generate(http, prompt, max_new_tokens=40)
    assert token_ids(by_adapter_id) == token_ids(by_model) == local["infused"].ids(prompt, 40)
    assert token_ids(base) == local["base"].ids(prompt, 40)
    assert token_ids(base) != token_ids(by_adapter_id)


def test_concurrent_requests_on_both_models_and_the_adapter_share_passes_and_stay_identical(
        http, server, local):
    jobs = [(model, prompt, 12 + 7 * (i % 4)) for i, (model, prompt) in
            enumerate((m, p) for p in PROMPTS for m in ("base", "infused", "qwen"))]
    engine = server.registry.models["base"].engine
    passes_before, tokens_before = engine.stats["forward_passes"], engine.stats["generated_tokens"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda job: http.post("/generate", json={
            "inputs": job[1], "model": job[0], "parameters": {"max_new_tokens": job[2], "details": True}}),
            jobs))
    for (model, prompt, n), reply in zip(jobs, replies, strict=True):
        assert reply.status_code == 200, reply.text
        assert token_ids(reply.json()) == local[model].ids(prompt, n), (model, prompt)
    passes = engine.stats["forward_passes"] - passes_before
    tokens = engine.stats["generated_tokens"] - tokens_before
    assert passes < tokens / 2, (passes, tokens)  # base and adapter rows decoded together


def test_generate_stream_sends_each_token_and_the_full_text_last(http):
    with http.stream("POST", "/generate_stream", json={"inputs": PROMPTS[0], "parameters": {
            "max_new_tokens": 30, "return_full_text": True}}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    whole = generate(http, PROMPTS[0], max_new_tokens=30)
    assert [e["token"]["id"] for e in events] == token_ids(whole)
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == PROMPTS[0] + whole["generated_text"]
    assert "".join(e["token"]["text"] for e in events) == whole["generated_text"]


def test_seed_makes_sampling_reproducible_and_a_tiny_top_p_is_greedy(http):
    sampled = dict(max_new_tokens=25, do_sample=True, temperature=1.0)
    first = generate(http, PROMPTS[2], seed=7, **sampled)
    again = generate(http, PROMPTS[2], seed=7, **sampled)
    other = generate(http, PROMPTS[2], seed=8, **sampled)
    greedy = generate(http, PROMPTS[2], max_new_tokens=25, do_sample=False)
    nucleus = generate(http, PROMPTS[2], seed=9, top_p=1e-6, **sampled)
    assert token_ids(first) == token_ids(again) and first["details"]["seed"] == 7
    assert token_ids(first) != token_ids(other) != token_ids(greedy)
    assert token_ids(nucleus) == token_ids(greedy)


def test_a_stop_sequence_ends_the_text_with_it_in_tgi_and_before_it_in_openai(http, client):
    full = generate(http, PROMPTS[3], max_new_tokens=40)["generated_text"]
    stop = full[12:16]
    assert stop.strip(), full
    cut = generate(http, PROMPTS[3], max_new_tokens=40, stop=[stop])
    assert cut["generated_text"] == full[:full.index(stop) + len(stop)]
    assert cut["details"]["finish_reason"] == "stop_sequence"
    with http.stream("POST", "/generate_stream", json={"inputs": PROMPTS[3], "parameters": {
            "max_new_tokens": 40, "stop": [stop]}}) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert "".join(e["token"]["text"] for e in events) == full[:full.index(stop) + len(stop)]
    completion = client.completions.create(model="base", prompt=PROMPTS[3], max_tokens=40, temperature=0,
                                           stop=[stop])
    assert completion.choices[0].text == full[:full.index(stop)]


def test_invocations_takes_a_list_of_inputs(http):
    reply = http.post("/invocations", json={"inputs": PROMPTS[:2], "parameters": {"max_new_tokens": 10}})
    singles = [generate(http, p, max_new_tokens=10)["generated_text"] for p in PROMPTS[:2]]
    assert [r["generated_text"] for r in reply.json()] == singles


# ---------------------------------------------------------------- OpenAI routes


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def test_openai_client_lists_models_and_completes_like_local_generation(client, local):
    assert [m.id for m in client.models.list().data] == ["base", "infused", "qwen"]
    completion = client.completions.create(model="qwen", prompt=PROMPTS[4], max_tokens=20, temperature=0)
    expected = local["qwen"].ids(PROMPTS[4], 20)
    assert completion.choices[0].text == local["qwen"].text(expected)
    assert completion.usage.completion_tokens == len(expected)
    assert completion.usage.prompt_tokens == len(local["qwen"].encode(PROMPTS[4]))
    streamed = client.completions.create(model="qwen", prompt=PROMPTS[4], max_tokens=20, temperature=0,
                                         stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == completion.choices[0].text


def test_openai_chat_uses_the_chat_template_and_streams_the_same_answer(client, local):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model="infused", messages=messages, max_tokens=30, temperature=0)
    tokenizer = local["infused"].tokenizer
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = local["infused"].ids(prompt, 30, eos=[tokenizer.eos_token_id, im_end])
    assert reply.choices[0].message.content == local["infused"].text(expected)
    assert reply.choices[0].message.role == "assistant" and reply.model == "infused"
    assert reply.usage.prompt_tokens == len(prompt)
    chunks = list(client.chat.completions.create(model="infused", messages=messages, max_tokens=30,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_end_of_turn_token_is_read_from_the_chat_template(tokenizer):
    assert end_of_turn_ids(tokenizer) == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


# ---------------------------------------------------------------- errors and limits


def test_requests_without_the_right_bearer_token_get_401(server):
    assert httpx.post(f"{server.url}/generate", json=SEED_PAYLOAD).status_code == 401
    wrong = httpx.post(f"{server.url}/generate", json=SEED_PAYLOAD, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/v1/models").json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/health").status_code == 200  # liveness probes need no key


def test_unknown_model_gets_404_in_each_protocol_shape(http, client):
    tgi = http.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "nope"}})
    assert tgi.status_code == 404 and "served models: base, infused, qwen" in tgi.json()["error"]
    import openai

    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="nope", prompt="x", max_tokens=3)
    assert "nope" in caught.value.message


@pytest.mark.parametrize("body, message", [
    ({"inputs": "x", "parameters": {"top_p": 2}},
     "parameters.top_p: Input should be less than or equal to 1"),
    ({"inputs": "", "parameters": {}}, "inputs: String should have at least 1 character"),
    ({"parameters": {}}, "inputs: Field required"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 1000}},
     "max_new_tokens 1000 is more than this server allows"),
    ({"inputs": "word " * 400}, "takes at most 300"),
    ({"inputs": "x" * 200_000}, "larger than 100000 bytes"),
])
def test_invalid_requests_get_a_readable_422_or_413(http, body, message):
    response = http.post("/generate", json=body)
    assert response.status_code == (413 if "bytes" in message else 422)
    assert message in response.json()["error"], response.json()


def test_openai_validation_errors_use_the_openai_shape(client):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:  # a 400 invalid_request_error, as OpenAI and vLLM answer
        client.chat.completions.create(model="base", messages=[], max_tokens=3)
    assert "messages: List should have at least 1 item" in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="max_tokens 100000 is more than this server allows"):
        client.completions.create(model="base", prompt="x", max_tokens=100_000)


def test_tools_reach_the_prompt_as_sft_training_wrote_them(client, tokenizer):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"day\": \"today\"}"}}
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = client.chat.completions.create(model="base", messages=messages, tools=tools, max_tokens=2)
    conversation = chat_request(messages, tools)
    trained_as = render(tokenizer, tokenizer.chat_template, *chat_inputs(conversation.messages, conversation.tools,
                                                                         tokenizer.chat_template),
                        add_generation_prompt=True)
    assert "You may call these functions" in trained_as  # this template has no place for tools: the system turn
    assert '{"name": "weather", "arguments": {"day": "today"}}<|im_end|>' in trained_as
    assert reply.usage.prompt_tokens == len(tokenizer(trained_as, add_special_tokens=False).input_ids)
    chunks = list(client.chat.completions.create(model="base", messages=messages, tools=tools, max_tokens=3,
                                                 stream=True))
    assert chunks[-1].choices[0].finish_reason in ("length", "stop", "tool_calls")


@pytest.mark.parametrize("text, words, calls", [
    ('{"name": "f", "arguments": {"x": 1}}', "", [("f", '{"x": 1}')]),
    ('Checking.\n[{"name": "f", "arguments": {}}, {"name": "g", "arguments": "{}"}]', "Checking.",
     [("f", "{}"), ("g", "{}")]),
    ('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', "", [("f", '{"x": 1}')]),
    ('{"name": "g", "parameters": {"x": 1}}', "", [("g", '{"x": 1}')]),  # as Llama 3.1 writes a call
    ("It is sunny today.", "It is sunny today.", None),
    ('{"temperature": 20}', '{"temperature": 20}', None),
    ('Here:\n{"name": "Bob", "age": 3}', 'Here:\n{"name": "Bob", "age": 3}', None),  # JSON, but no tool's name
])
def test_an_answer_that_calls_a_tool_comes_back_as_tool_calls(text, words, calls):
    found_words, found = tool_calls_in(text, {"f", "g"})
    assert found_words == words
    assert ([(c["function"]["name"], c["function"]["arguments"]) for c in found] if found else None) == calls


def test_one_model_is_described_by_its_name_and_greedy_answers_report_no_seed(client, http, adapter_dir):
    card = client.models.retrieve("infused")
    assert card.id == "infused" and card.adapter == str(adapter_dir.resolve())
    import openai

    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    assert generate(http, "The city", max_new_tokens=2)["details"]["seed"] is None


def test_what_differs_from_how_an_adapter_was_trained_is_named(adapter_dir, tiny_llama_dir, qwen_dir, tmp_path):
    from infuse.models import adapter_differences

    assert adapter_differences(tiny_llama_dir, adapter_dir) == []
    qlora = shutil.copytree(adapter_dir, tmp_path / "qlora")
    (qlora / "infuse_run.json").write_text(json.dumps({"config": {"finetuning_type": "qlora"}}))
    notes = adapter_differences(qwen_dir, qlora)
    assert notes[0] == f"the adapter was trained on {tiny_llama_dir}, and is used here on {qwen_dir}."
    assert notes[1].startswith("a QLoRA adapter, trained on the 4-bit quantized base, used here on the unquantized")


def test_a_completion_prompt_may_be_token_ids(client, local):
    ids = local["base"].encode("The history of the city")
    as_text = client.completions.create(model="base", prompt="The history of the city", max_tokens=5, temperature=0)
    as_ids = client.completions.create(model="base", prompt=ids, max_tokens=5, echo=True, temperature=0)
    assert as_ids.choices[0].text == local["base"].tokenizer.decode(ids) + as_text.choices[0].text
    assert as_ids.usage.prompt_tokens == len(ids)
    import openai

    with pytest.raises(openai.BadRequestError, match="token id 99999 is not in base's vocabulary of 2048 ids"):
        client.completions.create(model="base", prompt=[5, 99999], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="a prompt may not be empty"):
        client.completions.create(model="base", prompt=[], max_tokens=2)
    # lm-eval's log-likelihood request: refused with the reason, not answered with logprobs null
    with pytest.raises(openai.BadRequestError, match="does not return logprobs; for lm-eval tasks run"):
        client.completions.create(model="base", prompt=[ids], max_tokens=1, logprobs=1, echo=True, temperature=0)


def streamed(pieces: list[str], tool_names: set[str]) -> list[dict]:
    """The chunks ``_chunks`` sends for a reply that comes in ``pieces`` (a fake generation)."""
    import asyncio

    from infuse.serve.engine import Event
    from infuse.serve.openai_api import _chunks

    class Reply:
        prompt_tokens = 3

        async def __aiter__(self):
            for i, piece in enumerate(pieces):
                yield Event(token_id=i, text=piece, finish_reason="eos_token" if i == len(pieces) - 1 else None)

    async def collect():
        return [c async for c in _chunks(Reply(), lambda text, finish: {"delta": text, "finish": finish}, "",
                                         None, None, tool_names)]

    return [json.loads(c.removeprefix("data: ")) for c in asyncio.run(collect()) if "[DONE]" not in c]


def test_a_streamed_reply_that_is_a_call_comes_as_one_tool_calls_delta():
    [only] = streamed(['{"name": "f", ', '"arguments": {"x": 1}}'], {"f"})
    assert only["finish"] == "tool_calls" and only["delta"]["content"] is None
    [call] = only["delta"]["tool_calls"]
    assert call["index"] == 0 and call["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert [c["delta"] for c in streamed(["It ", "is ", "sunny."], {"f"})] == ["It ", "is ", "sunny."]
    not_a_call = streamed(['{"temperature": ', "20}"], {"f"})  # held back, then sent as the text it is
    assert [(c["delta"], c["finish"]) for c in not_a_call] == [('{"temperature": 20}', "stop")]


def test_huggingface_hub_inference_client_generates_and_streams_through_the_root_route(server):
    from huggingface_hub import InferenceClient

    hub = InferenceClient(model=server.url, token=KEY)
    text = hub.text_generation("The history of the city", max_new_tokens=6)
    streamed = list(hub.text_generation("The history of the city", max_new_tokens=6, stream=True))
    assert text and "".join(streamed) == text


def test_a_full_queue_answers_503_with_retry_after(tiny_llama_dir):
    with start_server({"base": str(tiny_llama_dir)}, max_batch_size=1, max_queue=0) as handle:
        assert httpx.get(f"{handle.url}/info").json()["max_input_tokens"] == 511  # the context of 512, not 4096
        body = {"inputs": "The", "parameters": {"max_new_tokens": 300}}
        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(lambda _: httpx.post(f"{handle.url}/generate", json=body, timeout=60),
                                    range(6)))
        metrics = httpx.get(f"{handle.url}/metrics").text
    refused = [r for r in replies if r.status_code == 503]
    assert refused and len(refused) < 6, [r.status_code for r in replies]
    assert refused[0].headers["retry-after"] == "1" and refused[0].json()["error_type"] == "overloaded"
    assert f"infuse_rejected_total {len(refused)}" in metrics


def test_a_client_that_disconnects_stops_its_generation(http, server):
    engine = server.registry.models["qwen"].engine
    tokens_before = engine.stats["generated_tokens"]
    with http.stream("POST", "/generate_stream", json={"inputs": "The", "model": "qwen",
                                                       "parameters": {"max_new_tokens": 256}}) as response:
        next(response.iter_lines())
    for _ in range(200):
        if engine.load == (0, 0):
            break
        threading.Event().wait(0.02)
    assert engine.load == (0, 0)
    assert engine.stats["generated_tokens"] - tokens_before < 200
    assert 'infuse_generations_total{model="qwen",reason="cancelled"} 1' in http.get("/metrics").text


def test_health_and_metrics_report_what_happened(http):
    generate(http, "The", max_new_tokens=5)
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["models"] == ["base", "infused", "qwen"]
    metrics = http.get("/metrics").text
    assert "# TYPE infuse_requests_total counter" in metrics
    assert 'infuse_requests_total{endpoint="/generate",status="200"}' in metrics
    generated = next(line for line in metrics.splitlines()
                     if line.startswith('infuse_generated_tokens_total{model="base"}'))
    assert int(generated.split()[-1]) >= 5


# ---------------------------------------------------------------- safety and vLLM


def test_pickled_weights_are_refused(tmp_path, tiny_llama_dir):
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(InfuseError, match="pickled .bin"):
        check_safetensors(str(tmp_path), None)


def test_model_specs_are_parsed_and_bad_ones_explained():
    assert parse_model_specs(["a=m", "b=m+ad", "out/run"]) == {"a": "m", "b": "m+ad", "run": "out/run"}
    with pytest.raises(InfuseError, match="given twice"):
        parse_model_specs(["a=m", "a=n"])
    with pytest.raises(InfuseError, match="NAME=PATH"):
        parse_model_specs(["=m"])


def test_vllm_command_maps_models_and_flags(tiny_llama_dir, adapter_dir):
    options = ServeOptions(host="0.0.0.0", port=9000, api_key="k", dtype="bfloat16")
    models = {"base": str(tiny_llama_dir), "infused": f"{tiny_llama_dir}+{adapter_dir}"}
    command = vllm_command(models, options)
    assert command == ["vllm", "serve", str(tiny_llama_dir), "--host", "0.0.0.0", "--port", "9000",
                       "--served-model-name", "base", "--enable-lora",
                       "--lora-modules", f"infused={adapter_dir}",
                       "--max-loras", "1", "--max-lora-rank", "8", "--api-key", "k", "--dtype", "bfloat16"]


def test_vllm_needs_one_base_and_an_install(tiny_llama_dir, qwen_dir):
    with pytest.raises(InfuseError, match="one base model per process"):
        vllm_command({"a": str(tiny_llama_dir), "b": str(qwen_dir)}, ServeOptions())
    with pytest.raises(InfuseError, match=r"pip install 'infuse-llm\[vllm\]'"):
        run_vllm({"a": str(tiny_llama_dir)}, ServeOptions())
