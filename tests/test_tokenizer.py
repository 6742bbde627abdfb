import pytest
from transformers import AutoTokenizer

from infuse.errors import InfuseError
from infuse.tokenizer import train_tokenizer


def test_trained_tokenizer_reloads_with_special_tokens_and_template(tokenizer_dir, shared_data):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 2048
    assert None not in (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id)
    assert tok.pad_token_id != tok.eos_token_id
    text = (shared_data / "wiki_demo.txt").read_text().splitlines()[0][:500]
    assert tok.decode(tok(text).input_ids) == text  # byte-level: lossless round trip
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], tokenize=False
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    assert tok.convert_tokens_to_ids("<|im_end|>") != tok.unk_token_id


def test_too_small_vocab_is_rejected(tmp_path, shared_data):
    with pytest.raises(InfuseError, match="too small"):
        train_tokenizer([shared_data / "wiki_demo.txt"], 100, tmp_path)


def test_empty_corpus_is_rejected(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(InfuseError, match="empty"):
        train_tokenizer([empty], 1000, tmp_path / "tok")


def test_max_token_length_caps_merged_tokens_and_keeps_the_round_trip(tmp_path, shared_data):
    corpus = shared_data / "wiki_demo.txt"
    tok = train_tokenizer([corpus], 1024, tmp_path / "tok", max_token_length=5)
    longest = max(len(piece) for piece in tok.get_vocab() if not piece.startswith("<"))
    assert longest <= 5
    unbounded = train_tokenizer([corpus], 1024, tmp_path / "free")
    assert max(len(piece) for piece in unbounded.get_vocab() if not piece.startswith("<")) > 5
    text = corpus.read_text().splitlines()[0][:300]
    assert len(tok(text).input_ids) > len(unbounded(text).input_ids)
    assert tok.decode(tok(text).input_ids) == text
