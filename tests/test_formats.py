"""Rows of alpaca, sharegpt, OpenAI messages and raw text become conversations; bad rows are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infuse.data.formats import detect_format, load_conversations
from infuse.errors import InfuseError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_alpaca_demo_loads_as_alpaca(shared_data):
    rows = json.loads((shared_data / "alpaca_en_demo.json").read_text())
    conversations, stats = load_conversations([shared_data / "alpaca_en_demo.json"])
    assert stats.rows == len(rows) == len(conversations) == 999
    assert set(stats.formats.values()) == {"alpaca"}
    with_input = next(i for i, row in enumerate(rows) if row["input"])
    user, assistant = conversations[with_input].messages
    row = rows[with_input]
    assert user == {"role": "user", "content": row["instruction"] + "\n" + row["input"]}
    assert assistant == {"role": "assistant", "content": row["output"]}
    assert conversations[with_input].where.endswith(f"alpaca_en_demo.json[{with_input}]")


def test_identity_placeholders_are_filled_and_the_missing_ones_counted(shared_data):
    path = shared_data / "identity.json"
    rows = json.loads(path.read_text())
    conversations, stats = load_conversations([path], placeholders={"name": "Infuse"})
    assert len(conversations) == 91 and stats.formats == {str(path): "alpaca"}
    answers = [c.messages[-1]["content"] for c in conversations]
    assert answers[0] == rows[0]["output"].replace("{{name}}", "Infuse")
    assert not any("{{name}}" in answer for answer in answers)
    assert stats.unfilled_placeholders["author"] == sum(row["output"].count("{{author}}") for row in rows) > 0


def test_glaive_toolcall_demo_maps_roles_and_tools(shared_data):
    path = shared_data / "glaive_toolcall_en_demo.json"
    rows = json.loads(path.read_text())
    conversations, stats = load_conversations([path])
    assert len(conversations) == 300 and set(stats.formats.values()) == {"sharegpt"}
    mapping = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}
    for row, conversation in zip(rows, conversations, strict=True):
        turns = row["conversations"]
        assert [m["role"] for m in conversation.messages] == [mapping[t["from"]] for t in turns]
        for turn, message in zip(turns, conversation.messages, strict=True):
            if turn["from"] == "function_call":  # the call, its arguments an object, in OpenAI's shape
                written = json.loads(turn["value"])
                assert message["content"] == "" and message["tool_calls"] == [
                    {"type": "function", "function": {"name": written["name"], "arguments": written["arguments"]}}]
            else:
                assert message["content"] == turn["value"]
        described = json.loads(row["tools"]) if row["tools"] else []
        assert conversation.tools == ([{"type": "function", "function": tool} for tool in described] or None)
    assert sum(bool(c.tools) for c in conversations) == sum(row["tools"] not in ("", "[]") for row in rows)
    assert sum(bool(m.get("tool_calls")) for c in conversations for m in c.messages) > 100


def test_messages_text_and_sharegpt_variants(tmp_path):
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": parts}]}])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"system": "Sys", "conversations": [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}])
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "<s>[INST] Q [/INST] A </s>"}])
    conversations, stats = load_conversations([messages, sharegpt, text])
    assert list(stats.formats.values()) == ["messages", "sharegpt", "text"]
    assert conversations[0].messages[2] == {"role": "assistant", "content": "Hello"}
    assert [m["role"] for m in conversations[1].messages] == ["system", "user", "assistant"]
    assert conversations[1].messages[0]["content"] == "Sys"
    assert conversations[2].text == "<s>[INST] Q [/INST] A </s>" and conversations[2].messages == []


def test_alpaca_system_and_history_come_before_the_question(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q2", "output": "A2", "system": "S",
                                              "history": [["Q1", "A1"]]}])
    (conversation,), _ = load_conversations([path])
    assert [(m["role"], m["content"]) for m in conversation.messages] == [
        ("system", "S"), ("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]


def test_openai_and_sharegpt_tool_calls_take_one_shape(tmp_path):
    call = {"type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}
    messages = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "3"}, {"role": "assistant", "content": "It is 3."}],
        "tools": [{"type": "function", "function": {"name": "f"}}]}])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "human", "value": "Q"}, {"from": "function_call", "value": '{"name": "f", "arguments": {"x": 1}}'},
        {"from": "observation", "value": "3"}, {"from": "gpt", "value": "It is 3."}], "tools": '[{"name": "f"}]'}])
    (from_messages, from_sharegpt), _ = load_conversations([messages, sharegpt])
    assert from_messages.messages == from_sharegpt.messages and from_messages.tools == from_sharegpt.tools
    assert from_messages.messages[1] == {"role": "assistant", "content": "",
                                         "tool_calls": [{"type": "function", "function": {"name": "f",
                                                                                          "arguments": {"x": 1}}}]}
    assert from_messages.messages[2]["role"] == "tool"


def test_call_ids_and_the_tool_a_result_answers_are_kept_for_templates_that_write_them(tmp_path):
    call = {"id": "c1", "function": {"name": "f", "arguments": {}}}
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "3"},
        {"role": "assistant", "content": None, "function_call": {"name": "g", "arguments": "{}"}}]}])
    (conversation,), _ = load_conversations([path])
    assert conversation.messages[1]["tool_calls"][0]["id"] == "c1"
    assert conversation.messages[2] == {"role": "tool", "content": "3", "tool_call_id": "c1", "name": "f"}
    assert conversation.messages[3]["tool_calls"] == [{"type": "function", "function": {"name": "g", "arguments": {}}}]


def test_folders_are_searched_and_the_format_can_be_named(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": "Q", "output": "A"}])
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Q0", "output": "A0"}])
    (tmp_path / "notes.txt").write_text("ignored: not a record file")
    conversations, _ = load_conversations([tmp_path], dataset_format="alpaca")
    assert [c.messages[0]["content"] for c in conversations] == ["Q0", "Q"]
    with pytest.raises(InfuseError, match="dataset_format: 'alpacca'"):
        load_conversations([tmp_path], dataset_format="alpacca")


GOOD_ROWS = {
    "instruction": {"instruction": "Q", "output": "A"},
    "messages": {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
    "conversations": {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
}
BAD_ROWS = [
    ({"instruction": "Q"}, "'output' field is missing"),
    ({"instruction": "Q", "output": 3}, "'output' should be a string, found int"),
    ({"instruction": "Q", "output": "  "}, "empty assistant turn"),
    ({"instruction": "", "input": "", "output": "A"}, "no question"),
    ({"instruction": "Q", "output": "A", "history": [["only one"]]}, "'history' item 0"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "robot", "value": "A"}]},
     "unknown role 'robot'"),
    ({"conversations": "human: Q"}, "'conversations' should be a list"),
    ({"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "A"}]}, "should be a string"),
    ({"conversations": [{"from": "human", "text": "Q"}]}, "needs 'from' and 'value'"),
    ({"conversations": [{"from": "human", "value": "Q"}]}, "no assistant turn"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}], "tools": "{oops"},
     "'tools' is a string but not valid JSON"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "system", "content": "S"},
                   {"role": "assistant", "content": "A"}]}, "system message may only come first"),
    ({"messages": []}, "no messages"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "call f"}]},
     "a function_call turn is not valid JSON"),
    ({"messages": [{"role": "user", "content": "Q"},
                   {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]},
     "the arguments of f is not valid JSON"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
      "tools": [{"type": "function"}]}, "should describe a function with a 'name'"),
]


def test_formats_are_detected_row_by_row(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD_ROWS["messages"], GOOD_ROWS["instruction"],
                                                  GOOD_ROWS["conversations"]])
    conversations, stats = load_conversations([path])
    assert [c.messages[-1]["content"] for c in conversations] == ["A", "A", "A"]
    assert stats.formats == {str(path): "alpaca+messages+sharegpt"}
    write_jsonl(path, [GOOD_ROWS["conversations"], {"instruction": "Q"}])  # read as the alpaca row it nearly is
    with pytest.raises(InfuseError, match="mixed.jsonl:2: not a valid alpaca row: the 'output' field is missing"):
        load_conversations([path])


def test_a_byte_order_mark_is_not_read_as_text(tmp_path):
    for name, text in (("rows.jsonl", json.dumps(GOOD_ROWS["instruction"]) + "\n"),
                       ("rows.json", json.dumps([GOOD_ROWS["instruction"]]))):
        (tmp_path / name).write_text(text, encoding="utf-8-sig")
        conversations, _ = load_conversations([tmp_path / name])
        assert conversations[0].messages[0]["content"] == "Q"


def test_a_line_that_is_not_json_is_a_bad_row_too(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD_ROWS["instruction"]) + '\n{"instruction": "Q", "output": "A"\n')
    with pytest.raises(InfuseError, match=f"{path}:2: this line is not valid JSON .* at the end of the line"):
        load_conversations([path])
    conversations, stats = load_conversations([path], bad_rows="skip")
    assert len(conversations) == 1 and stats.skipped == {"not_json": 1}


@pytest.mark.parametrize(("row", "problem"), BAD_ROWS, ids=[problem for _, problem in BAD_ROWS])
def test_a_bad_row_is_an_error_naming_file_and_line(tmp_path, row, problem):
    good = GOOD_ROWS[next(key for key in GOOD_ROWS if key in row)]
    path = write_jsonl(tmp_path / "data.jsonl", [good, row, good])
    with pytest.raises(InfuseError) as error:
        load_conversations([path])
    assert f"{path}:2:" in str(error.value) and problem in str(error.value)
    assert "bad_rows: skip" in str(error.value)

    conversations, stats = load_conversations([path], bad_rows="skip")
    assert len(conversations) == 2 and stats.rows == 3
    assert stats.to_dict()["skipped_rows"] == 1
    assert stats.skipped_examples[0].startswith(f"{path}:2:") and problem in stats.skipped_examples[0]


def test_undetectable_rows_name_the_fields_found(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "Q", "answer": "A"}])
    with pytest.raises(InfuseError, match=r"x.jsonl:1: cannot tell the data format .*answer, question"):
        load_conversations([path])
    assert detect_format({"question": "Q"}) is None
    assert detect_format({"instruction": "Q", "output": "A"}) == "alpaca"


def test_missing_and_unsupported_sources_are_errors(tmp_path):
    with pytest.raises(InfuseError, match="no such file or folder"):
        load_conversations([tmp_path / "absent.jsonl"])
    with pytest.raises(InfuseError, match=r"^https://example\.com/chats\.jsonl: training reads files and folders, "
                                          r"not URLs\. Download"):
        load_conversations(["https://example.com/chats.jsonl"])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InfuseError, match="must be a .json, .jsonl or .parquet"):
        load_conversations([tmp_path / "notes.txt"])
    with pytest.raises(InfuseError, match="bad_rows: 'ignore'"):
        load_conversations([tmp_path / "notes.txt"], bad_rows="ignore")
