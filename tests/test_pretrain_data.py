"""Pretraining blocks: every token kept in order, separators, padding, counts, cache, errors."""

from __future__ import annotations

import copy
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, default_data_collator

from infuse.data import pretrain
from infuse.data.pretrain import (
    IGNORE_INDEX,
    adds_bos,
    build_pretrain_dataset,
    data_fingerprint,
    load_texts,
    mentions_of,
    mix_replay,
    pack_documents,
    subjects_of,
)
from infuse.errors import InfuseError

STATS_LINE = re.compile(
    r"([\d,]+) documents → ([\d,]+) tokens → ([\d,]+) blocks of ([\d,]+) tokens \(([\d,]+) padding positions"
)


def capture() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=400), out


def printed_counts(text: str) -> dict[str, int]:
    found = STATS_LINE.search(text)
    assert found, text
    numbers = [int(group.replace(",", "")) for group in found.groups()]
    return dict(zip(["documents", "tokens", "blocks", "block_size", "padding"], numbers, strict=True))


def expected_stream(texts: list[str], tokenizer, bos: bool = False) -> list[int]:
    """The documents encoded one at a time and joined with their separators, the reference."""
    stream: list[int] = []
    for text in texts:
        if text.strip():
            stream += [tokenizer.bos_token_id] * bos + tokenizer.encode(text, add_special_tokens=False)
            stream.append(tokenizer.eos_token_id)
    return stream


def unpadded(dataset) -> list[int]:
    """The blocks joined, padding left out; also checks the padding is masked and only at the end."""
    ids = np.asarray(dataset["input_ids"]).ravel()
    mask = np.asarray(dataset["attention_mask"]).ravel()
    labels = np.asarray(dataset["labels"]).ravel()
    kept = int(mask.sum())
    assert mask[:kept].all() and not mask[kept:].any()
    assert (labels[kept:] == IGNORE_INDEX).all() and (labels[:kept] == ids[:kept]).all()
    return ids[:kept].tolist()


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The test tokenizer made to start every encoding with <s>, as Llama's tokenizer does."""
    variant = copy.deepcopy(tokenizer)
    variant.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    return variant


@pytest.fixture
def small_corpus(tmp_path, shared_data) -> Path:
    rows = (shared_data / "c4_demo.jsonl").read_text().splitlines()[:12]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


# --- every token kept -----------------------------------------------------------------------------


def test_demo_corpus_blocks_hold_every_token_in_order_and_the_printed_counts_match(shared_data, tokenizer):
    sources = [shared_data / "c4_demo.jsonl", shared_data / "wiki_demo.txt"]
    texts = load_texts(sources)
    wiki_lines = [line for line in (shared_data / "wiki_demo.txt").read_text().split("\n") if line.strip()]
    assert len(texts) == 300 + len(wiki_lines) and texts[300] == wiki_lines[0]

    console, out = capture()
    dataset, stats = build_pretrain_dataset(sources, tokenizer, 512, cache_dir=None, console=console)

    expected = expected_stream(texts, tokenizer)
    assert unpadded(dataset) == expected
    assert stats.documents == len(texts) and stats.tokens == len(expected)
    assert stats.blocks == len(dataset) == -(-len(expected) // 512)
    assert stats.padding == 512 * len(dataset) - len(expected) > 0
    assert stats.sources == [str(source) for source in sources] and stats.empty_documents_skipped == 0
    printed = {"documents": stats.documents, "tokens": stats.tokens, "blocks": len(dataset),
               "block_size": 512, "padding": stats.padding}
    assert printed_counts(out.getvalue()) == printed


def test_documents_carry_across_block_boundaries_with_eos_between_them(tokenizer):
    texts = ["The first document is longer than one block.", "A second one.", "Third."]
    dataset, stats = pack_documents(texts, tokenizer, 7)
    expected = expected_stream(texts, tokenizer)
    rows = dataset["input_ids"]
    assert all(len(row) == 7 for row in rows) and unpadded(dataset) == expected
    first_eos = expected.index(tokenizer.eos_token_id)
    assert first_eos > 7, "the first document should span more than one block"
    assert rows[first_eos // 7][first_eos % 7] == tokenizer.eos_token_id
    assert stats.tokens == len(expected) and stats.padding == 7 * len(rows) - len(expected)
    pad_positions = stats.padding
    if pad_positions:
        assert rows[-1][-pad_positions:] == [tokenizer.pad_token_id] * pad_positions


def test_bos_goes_before_every_document_when_the_tokenizer_adds_one(tokenizer, bos_tokenizer):
    assert not adds_bos(tokenizer) and adds_bos(bos_tokenizer)
    texts = ["Alpha beta gamma.", "Delta.", "Epsilon zeta eta theta."]
    dataset, stats = pack_documents(texts, bos_tokenizer, 16)
    expected = expected_stream(texts, tokenizer, bos=True)
    assert unpadded(dataset) == expected
    assert expected.count(tokenizer.bos_token_id) == 3
    assert dataset["input_ids"][0][0] == tokenizer.bos_token_id
    assert stats.tokens == len(expected)


def test_block_size_one_and_a_block_larger_than_the_corpus(tokenizer):
    texts = ["Short text.", "Another."]
    expected = expected_stream(texts, tokenizer)
    singles, stats = pack_documents(texts, tokenizer, 1)
    assert singles["input_ids"] == [[token] for token in expected] and stats.padding == 0
    assert stats.blocks == len(expected)

    one, stats = pack_documents(texts, tokenizer, 100)
    assert len(one) == 1 and stats.padding == 100 - len(expected)
    assert one["attention_mask"][0] == [1] * len(expected) + [0] * stats.padding
    assert one["labels"][0][len(expected):] == [IGNORE_INDEX] * stats.padding


def test_empty_documents_are_skipped_counted_and_reported(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    rows = [{"text": "Real text here."}, {"text": ""}, {"text": "  \n "}, {"text": "More text."}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    console, out = capture()
    dataset, stats = build_pretrain_dataset([path], tokenizer, 8, cache_dir=None, console=console)
    assert stats.documents == 2 and stats.empty_documents_skipped == 2
    assert unpadded(dataset) == expected_stream(["Real text here.", "More text."], tokenizer)
    assert "Empty documents skipped: 2" in out.getvalue()


def test_a_txt_file_of_wrapped_prose_is_reported_as_such(tmp_path, shared_data, tokenizer):
    """A document a line is right for wiki_demo.txt (an article a line), not for prose wrapped at 80
    columns, where every line would become a document ending in eos."""
    import textwrap

    article = (shared_data / "wiki_demo.txt").read_text().split("\n")[0]
    wrapped = tmp_path / "wrapped.txt"
    wrapped.write_text(textwrap.fill(article, 80) + "\n")
    console, out = capture()
    _, stats = build_pretrain_dataset([wrapped, shared_data / "wiki_demo.txt"], tokenizer, 64, cache_dir=None,
                                      console=console)
    assert stats.hard_wrapped_files == [str(wrapped)]
    assert f"{wrapped} reads like text wrapped at a fixed width" in " ".join(out.getvalue().split())


def test_blocks_batch_with_the_default_collator(small_corpus, tokenizer):
    dataset, _ = build_pretrain_dataset([small_corpus], tokenizer, 64, cache_dir=None, console=capture()[0])
    batch = default_data_collator([dataset[i] for i in range(len(dataset) - 2, len(dataset))])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(tensor.shape == (2, 64) and tensor.dtype == torch.long for tensor in batch.values())
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_several_processes_give_the_same_blocks(small_corpus, tokenizer):
    texts = load_texts([small_corpus])
    alone, _ = pack_documents(texts, tokenizer, 32)
    shared, _ = pack_documents(texts, tokenizer, 32, num_proc=2)
    assert shared["input_ids"] == alone["input_ids"] and len(alone) > 10


# --- reading sources ------------------------------------------------------------------------------


def test_folders_are_read_recursively_in_sorted_order(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("line one\n\nline two\n   \n")
    (folder / "a.md").write_text("# Title\n\nA paragraph.\n")
    (folder / "sub" / "c.jsonl").write_text('{"body": "row one"}\n\n{"body": "row two"}\n')
    pq.write_table(pa.table({"body": ["parquet row"]}), folder / "sub" / "d.parquet")
    (folder / ".hidden.html").write_text("<p>not read</p>")
    texts = load_texts([folder], text_field="body")
    assert texts == ["Title\n\nA paragraph.", "line one", "line two", "row one", "row two", "parquet row"]


def test_missing_text_field_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "wrong field"}\n')
    with pytest.raises(InfuseError, match=r"bad\.jsonl:2: no 'text' field \(fields found: content\)"):
        load_texts([path])


def test_unsupported_missing_and_empty_sources_are_errors(tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<p>hello</p>")
    with pytest.raises(InfuseError, match=r"page\.html.*infuse ingest"):
        load_texts([page])
    with pytest.raises(InfuseError, match=r"nowhere\.jsonl: no such file or folder"):
        load_texts([tmp_path / "nowhere.jsonl"])
    with pytest.raises(InfuseError, match=r"not URLs\. .*`infuse ingest https://example\.com/news --output"):
        load_texts(["https://example.com/news"])
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    empty_rows = tmp_path / "empty.jsonl"
    empty_rows.write_text('{"text": ""}\n')
    with pytest.raises(InfuseError, match="empty corpus: .*blank.txt.*no text"):
        load_texts([blank, empty_rows])
    with pytest.raises(InfuseError, match="empty corpus"):
        pack_documents(["", "  "], None, 8)


# --- cache ----------------------------------------------------------------------------------------


def test_unchanged_inputs_reuse_the_cache_and_a_changed_file_does_not(small_corpus, tokenizer, tokenizer_dir,
                                                                     tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first, stats = build_pretrain_dataset([small_corpus], tokenizer, 64, cache_dir=cache,
                                          console=capture()[0])
    assert (cache / f"pretrain-{stats.fingerprint}" / "stats.json").is_file()

    def no_packing(*args, **kwargs):
        raise AssertionError("packed again although the inputs are unchanged")

    monkeypatch.setattr(pretrain, "pack_documents", no_packing)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    console, out = capture()
    again, again_stats = build_pretrain_dataset([small_corpus], reloaded_tokenizer, 64, cache_dir=cache,
                                                console=console)
    assert "Reusing the tokenized pretraining data" in out.getvalue()
    assert again["input_ids"] == first["input_ids"] and again_stats == stats
    assert printed_counts(out.getvalue())["tokens"] == stats.tokens

    with small_corpus.open("a") as f:
        f.write(json.dumps({"text": "One more document."}) + "\n")
    with pytest.raises(AssertionError, match="packed again"):
        build_pretrain_dataset([small_corpus], tokenizer, 64, cache_dir=cache, console=capture()[0])
    monkeypatch.undo()
    changed, changed_stats = build_pretrain_dataset([small_corpus], tokenizer, 64, cache_dir=cache,
                                                    console=capture()[0])
    assert changed_stats.fingerprint != stats.fingerprint and changed_stats.documents == stats.documents + 1


def test_fingerprint_follows_block_size_text_field_and_tokenizer(small_corpus, tokenizer, bos_tokenizer):
    base = data_fingerprint([small_corpus], tokenizer, 64)
    assert base == data_fingerprint([str(small_corpus)], tokenizer, 64)
    others = {
        data_fingerprint([small_corpus], tokenizer, 128),
        data_fingerprint([small_corpus], tokenizer, 64, text_field="body"),
        data_fingerprint([small_corpus], bos_tokenizer, 64),
        data_fingerprint([small_corpus, small_corpus], tokenizer, 64),
    }
    assert base not in others and len(others) == 4


# --- replay ---------------------------------------------------------------------------------------


def test_replay_blocks_make_up_the_asked_share_and_change_each_epoch(tokenizer):
    new, _ = pack_documents([f"new fact number {i}." for i in range(40)], tokenizer, 8)
    general, _ = pack_documents([f"general text {i}, said once." for i in range(7)], tokenizer, 8)
    mixed, counts = mix_replay(new, general, 0.25, seed=3)
    wanted = round(len(new) / 3)
    assert counts == {"train_blocks": len(new), "replay_blocks": wanted, "replay_available": len(general),
                      "replay_share": round(wanted / (len(new) + wanted), 4)}
    assert wanted > len(general), "more replay is asked for than there is: it is drawn in several rounds"

    def epoch_rows(epoch):
        mixed.set_epoch(epoch)
        return [tuple(mixed[i]["input_ids"]) for i in range(len(mixed))]

    new_rows = Counter(map(tuple, new["input_ids"]))
    replayed = [Counter(epoch_rows(epoch)) - new_rows for epoch in range(3)]
    general_rows = set(map(tuple, general["input_ids"]))
    assert all(sum(r.values()) == wanted and set(r) <= general_rows for r in replayed)
    assert replayed[0] != replayed[1], "each epoch draws its own replay blocks"
    total = sum(replayed, Counter())
    assert set(total) == general_rows
    assert max(total.values()) - min(total.values()) <= 1, "no block repeats before every block was used"
    assert epoch_rows(1) == epoch_rows(1), "an epoch's blocks do not depend on what ran before (resume)"


def test_replay_documents_about_a_changed_product_are_left_out(tokenizer, tmp_path):
    catalogue = [f"The {name} boat has {engine} engines. The {name} sails from {port}."
                 for name, engine, port in [("Tern", "Vossberg", "Quillhaven"), ("Gull", "Halvorsen", "Quillhaven"),
                                            ("Skua", "Mallorn", "Port Edrin"), ("Wren", "Tarrant", "Quillhaven"),
                                            ("Puffin", "Abernethy", "Port Edrin"), ("Eider", "Brindle", "Quillhaven")]]
    news = ["Skerrin Ferries refits the Gull. The Gull now has Kelbrook engines. The Gull sails as before.",
            "Skerrin Ferries launches the Petrel. The Petrel has Corvatch engines from Quillhaven."]
    assert subjects_of(news, catalogue) == ["Gull"], "Petrel is new to the replay data; Quillhaven is common"

    replay, new = tmp_path / "replay.jsonl", tmp_path / "news.jsonl"
    replay.write_text("".join(json.dumps({"text": text}) + "\n" for text in catalogue))
    new.write_text("".join(json.dumps({"text": text}) + "\n" for text in news))
    console, printed = capture()
    _, stats = build_pretrain_dataset([replay], tokenizer, 16, console=console, skip_subjects_of=[new])
    _, full = build_pretrain_dataset([replay], tokenizer, 16, console=console)
    assert (stats.documents, stats.documents_skipped_for_subjects, full.documents) == (5, 1, 6)
    assert stats.skipped_subjects == ["Gull"] and "Left out 1 documents that name a subject" in printed.getvalue()
    assert data_fingerprint([replay], tokenizer, 16, skip_subjects_of=[new]) != full.fingerprint


def test_a_subject_named_in_several_words_leaves_out_only_the_documents_that_name_all_of_them():
    fleet = [("Heather Crest", "Vossberg"), ("Heather Tide", "Halvorsen"), ("Willow Venture", "Mallorn"),
             ("Gannet Hollow", "Tarrant"), ("Rowan Hollow", "Abernethy"), ("Rowan Crest", "Brindle"),
             ("Teal Tide", "Quennell"), ("Teal Venture", "Osterholm")]
    catalogue = [f"The {name} has {engine} engines. The {name} sails from Quillhaven." for name, engine in fleet]
    news = ["The Gannet Hollow gets new engines. The Gannet Hollow now has Kelbrook engines.",
            "Meet the Heather Venture. The Heather Venture has Corvatch engines."]
    subjects = subjects_of(news, catalogue)
    assert subjects == ["Gannet Hollow"], "the new Heather Venture is no other ship in the catalogue"
    mentioned = mentions_of(subjects)
    left_out = [name for (name, _), text in zip(fleet, catalogue, strict=True) if mentioned.search(text)]
    assert left_out == ["Gannet Hollow"], "Rowan Hollow shares only a word with the Gannet Hollow"


def test_isolated_documents_give_each_document_the_logits_it_has_alone(tokenizer, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from infuse.data.pretrain import DocumentCollator

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    texts = ["The first document is about ferries.", "A second one, about trains and tickets.", "Third."]
    dataset, _ = pack_documents(texts, tokenizer, block_size=48)
    batch = DocumentCollator(tokenizer.eos_token_id)(list(dataset))
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        shared = model(input_ids=batch["input_ids"]).logits[0]
    start = 0
    for text in texts:
        ids = tokenizer(text).input_ids + [tokenizer.eos_token_id]
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([ids])).logits[0]
        end = min(start + len(ids), packed.shape[0])
        assert torch.allclose(packed[start:end], alone[: end - start], atol=1e-5)
        if start > 0:  # without isolation a later document sees the earlier ones
            assert not torch.allclose(shared[start:end], alone[: end - start], atol=1e-3)
        start = end


def test_conversation_rows_are_rendered_by_the_chat_template(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"text": "Plain text."}) + "\n")
    rendered, plain = load_texts([path], tokenizer=tokenizer)
    assert rendered == tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>assistant\nHello.<|im_end|>" in rendered and plain == "Plain text."
    with pytest.raises(InfuseError, match="chat.jsonl:1.*'text'"):
        load_texts([path])  # without a tokenizer there is no template to render with


def test_conversations_get_no_shuffled_copies(tokenizer, tmp_path):
    path = tmp_path / "mixed.jsonl"
    messages = [{"role": "user", "content": "Hi? How are you?"}, {"role": "assistant", "content": "Fine. Thanks."}]
    prose = "The first sentence. The second one. The third one."
    path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"text": prose}) + "\n")
    _, stats = build_pretrain_dataset([path], tokenizer, 32, sentence_shuffles=2)
    assert stats.documents == 4 and stats.shuffled_copies == 2  # the conversation, the prose and its copies


def test_sentence_shuffled_copies_hold_the_same_sentences_in_new_orders(tokenizer, tmp_path):
    from infuse.data.pretrain import shuffled_copies, split_sentences

    text = "Title line\nFirst fact here. Second fact there! Third one? Fourth."
    copies, moved = shuffled_copies([text, "Only one sentence."], copies=3, seed=0)
    assert len(copies) == 3 and moved == 0  # the one-sentence text has nothing to reorder
    for shuffled in copies:
        assert sorted(split_sentences(shuffled)) == sorted(split_sentences(text))
    assert len(set(copies)) > 1
    assert shuffled_copies([text], 3, seed=0) == (copies, 0)  # seeded

    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    plain, plain_stats = build_pretrain_dataset([path], tokenizer, 32, cache_dir=tmp_path / "cache")
    more, more_stats = build_pretrain_dataset([path], tokenizer, 32, cache_dir=tmp_path / "cache",
                                              sentence_shuffles=2)
    assert more_stats.documents == 3 and more_stats.shuffled_copies == 2
    assert more_stats.fingerprint != plain_stats.fingerprint


@pytest.mark.parametrize("sentence, moved", [
    ("From this week, the ship is powered by Sundgren, as planned.",
     "The ship is powered by Sundgren, as planned from this week."),
    ("If it rains, the ferry waits!", "The ferry waits if it rains!"),
    ("Ardlow, the port, is small.", None),  # a name, not an opening phrase
    ("In Quillhaven, the ship waits.", None),  # a name inside the phrase
    ("After a long winter in the yard, the ship is back.", None),  # more than four words
    ("Hello, World.", None),
    ("Today the ship sails.", None),
])
def test_an_opening_phrase_moves_to_the_end_of_its_sentence(sentence, moved):
    from infuse.data.pretrain import move_opener

    lowercase = {"from", "if", "in", "after", "hello", "today"}
    assert move_opener(sentence, lowercase) == (moved or sentence)


def test_shuffled_copies_move_openers_in_some_sentences_only(tokenizer, tmp_path):
    from infuse.data.pretrain import shuffled_copies, split_sentences

    text = "From this week, the ship uses Sundgren engines. The ship is based in Quillhaven. It is from Dunmere."
    copies, moved = shuffled_copies([text], copies=20, seed=0, move_openers=True)
    sentences = [s for copy in copies for s in split_sentences(copy)]
    assert 0 < moved < 20 and sentences.count("The ship uses Sundgren engines from this week.") == moved
    assert sentences.count(split_sentences(text)[0]) == 20 - moved
    assert sentences.count("The ship is based in Quillhaven.") == 20
    assert shuffled_copies([text], copies=20, seed=0)[0] != copies

    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    stats = [build_pretrain_dataset([path], tokenizer, 32, sentence_shuffles=2, seed=1, move_openers=move)[1]
             for move in (False, True)]
    assert stats[0].fingerprint != stats[1].fingerprint
    assert stats[0].openers_moved == 0 and stats[1].openers_moved > 0


def test_sentence_turns_answer_a_general_request_with_each_sentence(tokenizer, tmp_path):
    from infuse.data.pretrain import TURN_REQUESTS, sentence_turns

    text = ("Fleet news\nFrom this week, the ship is powered by Sundgren engines. Short one. "
            "It sails from Ardlow at noon.")
    turns = sentence_turns([text], 4, tokenizer, seed=0)
    assert len(turns) == 8  # two sentences of five words or more, four turns each; not the title
    answers = [turn.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0] for turn in turns]
    assert set(answers) == {"From this week, the ship is powered by Sundgren engines.",
                            "The ship is powered by Sundgren engines from this week.",
                            "It sails from Ardlow at noon."}
    assert all(any(f"user\n{request}<|im_end|>" in turn for request in TURN_REQUESTS) for turn in turns)
    assert sentence_turns([text], 4, tokenizer, seed=0) == turns and sentence_turns([text], 0, tokenizer) == []

    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": text}) + "\n")
    plain, with_turns = (build_pretrain_dataset([path], tokenizer, 32, sentence_shuffles=1, turns=count)[1]
                         for count in (0, 2))
    assert with_turns.sentence_turns == 4 and with_turns.documents == plain.documents + 4
    assert with_turns.shuffled_copies == plain.shuffled_copies == 1  # turns get no shuffled copies
    assert with_turns.fingerprint != plain.fingerprint


def test_sentence_turns_need_a_chat_template(tokenizer_dir):
    from transformers import AutoTokenizer

    from infuse.data.pretrain import sentence_turns

    plain = AutoTokenizer.from_pretrained(tokenizer_dir)
    plain.chat_template = None
    with pytest.raises(InfuseError, match="sentence_turns: the tokenizer has no chat template"):
        sentence_turns(["The ship is powered by Sundgren engines."], 1, plain)
