"""`infuse preflight`: what training would see, for sft and pt configs, and a non-zero exit on a
problem that would make the run useless."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from tokenizers import normalizers
from transformers import AutoModelForCausalLM, AutoTokenizer

import infuse.cli
import infuse.data.sft
from infuse.cli import main
from infuse.data.formats import load_conversations
from infuse.data.sft import IGNORE_INDEX, PaddedCollator
from infuse.data.templates import resolve_template

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """One printed line per line of output (rich wraps at 80 columns when stdout is not a terminal)."""
    monkeypatch.setattr(infuse.cli, "console", Console(width=400))


def preflight(capsys, config: Path | None, *overrides: str) -> tuple[int, str]:
    """Run `infuse preflight`; (exit code, what it printed)."""
    code = 0
    try:
        main(["preflight", *([str(config)] if config else []), *overrides])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def sft_overrides(model_dir: Path, dataset: Path, output: Path, *more: str) -> list[str]:
    return ["--stage", "sft", "--model_name_or_path", str(model_dir), "--dataset", str(dataset),
            "--template", "chatml", "--cutoff_len", "256", "--overlong", "truncate",
            "--output_dir", str(output), *more]


def number(pattern: str, text: str) -> int:
    return int(re.search(pattern, text).group(1).replace(",", ""))


@pytest.fixture
def no_weights(monkeypatch):
    """Preflight reads model configs only: loading weights fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("preflight loaded model weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_config", refuse)


def test_sft_preflight_on_alpaca_shows_samples_and_counts(capsys, tiny_llama_dir, shared_data, tmp_path,
                                                         no_weights):
    alpaca = shared_data / "alpaca_en_demo.json"
    overrides = sft_overrides(tiny_llama_dir, alpaca, tmp_path, "--cutoff_len", "512")
    code, out = preflight(capsys, None, *overrides)
    assert code == 0 and "Preflight passed" in out, out

    # Which samples are longer than cutoff_len, counted independently through the tokenizer's own
    # apply_chat_template: exactly those are truncated, and they are the ones whose <|im_end|> is cut off.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    chatml = resolve_template(tokenizer, "chatml")
    conversations, _ = load_conversations([alpaca])
    encodings = [tokenizer.apply_chat_template(c.messages, chat_template=chatml) for c in conversations]
    lengths = [len(encoding["input_ids"]) for encoding in encodings]
    longer = sum(length > 512 for length in lengths)
    assert 50 < longer < 500
    assert f"999 rows (alpaca) → 999 samples, {sum(min(n, 512) for n in lengths):,} tokens" in out
    assert f"Truncated samples: {longer}; dropped samples: 0; skipped rows: 0." in out
    assert f"End of turn '<|im_end|>' trained in {999 - longer:,} of 999 samples." in out
    assert f"warning: {longer} sample(s) do not train the end-of-turn marker" in out
    assert "Round trip text → tokens → text: 999 of 999 conversations come back unchanged." in out
    assert "A packed batch of 4 samples keeps" in out

    # Three samples are shown; without colours the trained text is written between ⟦ and ⟧.
    assert re.findall(r"Sample (\d+) of 999", out) == ["1", "500", "999"]
    last = out[out.index("Sample 999 of 999"):]
    answer = conversations[-1].messages[-1]["content"]
    assert f"<|im_start|>assistant\n⟦{answer}<|im_end|>⟧" in last
    assert number(r"Sample 999 of 999: \d+ tokens, (\d+) trained", out) == \
        len(tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"])
    assert "context max_position_embeddings 512 for cutoff_len 512" in out
    assert "Training would take 750 optimizer steps: 999 samples, 4 a step" in out


def test_sft_preflight_holds_out_the_eval_share_and_reads_eval_data_as_training_would(
    capsys, tiny_llama_dir, shared_data, tmp_path, no_weights
):
    identity = shared_data / "identity.json"
    code, out = preflight(capsys, None, *sft_overrides(tiny_llama_dir, identity, tmp_path, "--val_size", "0.2"))
    assert code == 0 and "Held out 19 of 91 samples for evaluation (val_size 0.2)" in out, out
    assert "Training would take 54 optimizer steps: 72 samples, 4 a step" in out  # ceil(72 / 4) * 3 epochs

    broken = tmp_path / "eval.jsonl"
    broken.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    overrides = sft_overrides(tiny_llama_dir, identity, tmp_path, "--eval_dataset", str(broken))
    code, out = preflight(capsys, None, *overrides)
    assert code == 2 and "Evaluation data:" in out and f"{broken}:1" in out, out


def test_pt_preflight_counts_blocks_and_checks_the_context(capsys, tiny_llama_config_path, tokenizer_dir,
                                                           shared_data, tmp_path, no_weights):
    overrides = ["--model_config", str(tiny_llama_config_path),
                 "--tokenizer_name_or_path", str(tokenizer_dir),
                 "--dataset", str(shared_data / "wiki_demo.txt"), "--block_size", "128",
                 "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out")]
    code, out = preflight(capsys, REPO / "configs" / "tiny-llama-pretrain.yaml", *overrides)
    assert code == 0 and "Preflight passed" in out, out
    tokens, blocks = number(r"→ ([\d,]+) tokens →", out), number(r"→ ([\d,]+) blocks of 128", out)
    assert number(r"Pretraining data: ([\d,]+) documents", out) == 30
    assert blocks == -(-tokens // 128) and f"{blocks * 128 - tokens} padding positions" in out
    assert f"Training would take {-(-blocks // 8) * 4:,} optimizer steps: {blocks:,} blocks, 8 a step" in out
    assert out.count("Reusing the tokenized pretraining data") == 0

    code, out = preflight(capsys, REPO / "configs" / "tiny-llama-pretrain.yaml", *overrides[:-4],
                          "--block_size", "1024", "--output_dir", str(tmp_path / "out"))
    assert code == 2 and "problem: block_size 1024 is longer than the model's context" in out
    assert "Preflight failed" in out


def test_preflight_says_what_training_would_do_with_the_output_dir(capsys, tiny_llama_dir, shared_data, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(json.loads((shared_data / "alpaca_en_demo.json").read_text())[:16]))
    out = tmp_path / "out"
    overrides = sft_overrides(tiny_llama_dir, data, out, "--finetuning_type", "lora", "--max_steps", "4",
                              "--save_steps", "2", "--per_device_train_batch_size", "2", "--report_to", "none")
    code, printed = preflight(capsys, None, *overrides)
    assert code == 0 and f"Output: {out}: no checkpoint to resume; training would start at step 0." in printed

    main(["train", *overrides])
    code, printed = preflight(capsys, None, *overrides)
    assert code == 0 and f"Output: {out} holds this run, trained to its last step and saved" in printed
    code, printed = preflight(capsys, None, *overrides, "--learning_rate", "1e-3")
    assert code == 2 and "problem:" in printed and "learning_rate: 0.0002 -> 0.001" in printed
    code, printed = preflight(capsys, None, *overrides, "--max_steps", "6")
    assert f"resume from {out / 'checkpoint-4'} (step 4, the run made longer: max_steps: 4 -> 6)." in printed

    (out / "infuse_run.json").unlink()
    code, printed = preflight(capsys, None, *overrides)
    assert f"training stopped at {out / 'checkpoint-4'}; `infuse train` would evaluate and save from it." in printed
    shutil.rmtree(out / "checkpoint-4")
    code, printed = preflight(capsys, None, *overrides)
    assert f"would resume from {out / 'checkpoint-2'} (step 2 of 4)." in printed


def test_a_model_built_from_a_config_shows_the_vocabulary_training_gives_it(capsys, tokenizer, tokenizer_dir,
                                                                             shared_data, tmp_path, no_weights):
    config = json.loads((REPO / "configs" / "tiny-llama.json").read_text())
    small = tmp_path / "small-vocabulary.json"
    small.write_text(json.dumps({**config, "vocab_size": 1000}))
    code, out = preflight(capsys, REPO / "configs" / "tiny-llama-pretrain.yaml", "--model_config", str(small),
                          "--tokenizer_name_or_path", str(tokenizer_dir),
                          "--dataset", str(shared_data / "wiki_demo.txt"), "--block_size", "128",
                          "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"))
    assert code == 0, out
    assert f"vocabulary {len(tokenizer)} (1000 in {small}, grown to the tokenizer's)" in " ".join(out.split())


def test_text_rows_that_never_train_an_end_of_turn_are_fatal(capsys, tiny_llama_dir, tmp_path):
    path = tmp_path / "plain.jsonl"
    path.write_text("".join(json.dumps({"text": f"Plain sentence number {i}."}) + "\n" for i in range(5)))
    code, out = preflight(capsys, None, *sft_overrides(tiny_llama_dir, path, tmp_path / "out"))
    assert code == 2
    assert "End of turn '<|im_end|>' trained in 0 of 5 samples." in out
    assert "problem: no sample trains the end-of-turn marker '<|im_end|>'" in out


def test_a_tokenizer_with_tokens_the_model_has_no_embedding_for_stops_preflight_and_training(
        capsys, tiny_llama_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.add_tokens(["<|emoji|>"])
    tokenizer.save_pretrained(tmp_path / "grown")
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello <|emoji|>"}]}) + "\n")
    overrides = [*sft_overrides(tiny_llama_dir, data, tmp_path / "out"), "--tokenizer_name_or_path",
                 str(tmp_path / "grown"), "--max_steps", "1"]
    code, out = preflight(capsys, None, *overrides)
    expected = f"the data holds token id {len(tokenizer) - 1}, but the model's vocabulary has 2048 entries"
    assert code == 2 and expected in " ".join(out.split())
    with pytest.raises(SystemExit):
        main(["train", *overrides])
    assert expected in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()  # stopped before the model was loaded


def test_template_markers_the_tokenizer_lacks_become_tokens_where_the_run_can_train_them(
        capsys, model_without_chatml_tokens, shared_data, tmp_path):
    data = shared_data / "alpaca_en_demo.json"
    code, out = preflight(capsys, None, *sft_overrides(model_without_chatml_tokens, data, tmp_path / "full",
                                                       "--finetuning_type", "full"))
    assert code == 0 and "Added <|im_start|>, <|im_end|> to the tokenizer as special tokens (2,050 tokens now)" in out
    code, out = preflight(capsys, None, *sft_overrides(model_without_chatml_tokens, data, tmp_path / "lora",
                                                       "--finetuning_type", "lora"))
    assert "Added" not in out and "warning: <|im_start|>, <|im_end|>, written by the template, are not one token" in out
    assert "a lora adapter cannot add tokens" in out


def test_a_long_sample_is_cut_in_the_middle_saying_how_much_trained_text_the_cut_hides():
    from infuse.preflight import clip_pieces

    clipped = clip_pieces([("a" * 600, False), ("b" * 100, True), ("c" * 300, False)], head=500, tail=250)
    assert clipped == [("a" * 500 + " … [250 characters, 100 of them trained] … ", False), ("c" * 250, False)]


def test_a_training_argument_the_trainer_refuses_is_fatal(capsys, tiny_llama_dir, shared_data, tmp_path):
    code, out = preflight(capsys, None, *sft_overrides(tiny_llama_dir, shared_data / "alpaca_en_demo.json",
                                                       tmp_path / "out", "--optim", "adamw_torchh"))
    assert code == 2 and "problem: Invalid training arguments" in out and "adamw_torchh" in out


def test_data_of_which_every_row_is_skipped_says_why_each_went(capsys, tiny_llama_dir, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "Hi", "output": ""}, {"instruction": "Hi", "output": 5},
                                {"instruction": "Hi", "output": "Yo", "history": "x"}]))
    code, out = preflight(capsys, None, *sft_overrides(tiny_llama_dir, path, tmp_path / "out", "--bad_rows", "skip"))
    assert code == 2 and "every row was skipped or dropped (alpaca 3)." in out
    assert "e.g. " in out and "bad.json[0]: not a valid alpaca row: message 1 is an empty assistant turn" in out
    assert "'history' should be a list of [question, answer] pairs, found str" in out  # brackets are not markup


def test_a_tokenizer_that_changes_the_text_is_fatal(capsys, tiny_llama_dir, shared_data, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.backend_tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.save_pretrained(tmp_path / "lowercase")
    identity = shared_data / "identity.json"
    lowercase = ("--tokenizer_name_or_path", str(tmp_path / "lowercase"))
    overrides = sft_overrides(tiny_llama_dir, identity, tmp_path / "out", *lowercase)
    code, out = preflight(capsys, None, *overrides)
    assert code == 2
    unchanged = number(r"Round trip text → tokens → text: (\d+) of 91 conversations come back unchanged", out)
    assert unchanged < 91 and f"{91 - unchanged} sample(s) do not survive tokenize → decode, e.g." in out
    assert "problem:" in out and "The tokenizer changes the text" in out


class MasksPadById(PaddedCollator):
    """The classic mistake: labels of every pad-token id masked, which with pad = eos masks the eos."""

    def __call__(self, features):
        batch = super().__call__(features)
        batch["labels"][batch["input_ids"] == self.pad_token_id] = IGNORE_INDEX
        return batch


def test_padding_masked_by_id_with_pad_equal_to_eos_is_fatal(capsys, monkeypatch, tiny_llama_dir, tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"instruction": f"Question {i}?", "output": "Answer " * (i + 1)} for i in range(6)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    more = ("--template", "llama2", "--packing", "false", "--pad_token", "eos")
    code, out = preflight(capsys, None, *sft_overrides(tiny_llama_dir, path, tmp_path / "out"), *more)
    assert code == 0 and "A padded (right) batch of 4 samples keeps" in out
    assert "pad = eos, and padding is masked by position" in out

    monkeypatch.setattr(infuse.data.sft, "make_collator", lambda tokenizer, packing: MasksPadById(
        tokenizer.pad_token_id))
    code, out = preflight(capsys, None, *sft_overrides(tiny_llama_dir, path, tmp_path / "out"), *more)
    trained = number(r"keeps \d+ of their (\d+) trained labels", out)
    assert code == 2 and f"keeps {trained - 4} of their {trained} trained labels" in out  # 4 lost </s>
    assert "problem: batching changes the trained labels" in out
