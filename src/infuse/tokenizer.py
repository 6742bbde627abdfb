"""Train a byte-level BPE tokenizer and save it as a transformers tokenizer directory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from infuse.data.records import is_record_file, read_records, text_of
from infuse.errors import InfuseError

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, IM_START, IM_END]

# ChatML: every turn is closed by <|im_end|>, which is also what generation stops on.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def iter_corpus(paths: Iterable[str | Path], text_field: str = "text") -> Iterator[str]:
    """Texts from plain-text files (one document a line) or JSON/JSONL/Parquet rows."""
    for path in map(Path, paths):
        if not path.is_file():
            raise InfuseError(f"{path}: corpus file not found.")
        if is_record_file(path):
            for row, where in read_records(path):
                yield text_of(row, where, text_field)
        else:
            with path.open(encoding="utf-8") as f:
                yield from (line for line in f if line.strip())


def train_tokenizer(
    corpus: Iterable[str | Path],
    vocab_size: int,
    output: str | Path,
    min_frequency: int = 2,
    text_field: str = "text",
    max_token_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``corpus`` files and save a reloadable tokenizer dir at ``output``.

    ``max_token_length`` caps the characters of a merged token, so names are spelled from pieces,
    as a large tokenizer spells the rare names a small corpus makes frequent.

    The saved tokenizer has bos/eos/unk/pad set (pad distinct from eos, so padding can be masked
    by id without masking real end-of-text tokens) and a ChatML chat template.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise InfuseError(
            f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least "
            f"{256 + len(SPECIAL_TOKENS)} entries (256 bytes and {len(SPECIAL_TOKENS)} special tokens)."
        )
    texts = list(iter_corpus(corpus, text_field))
    if not texts:
        raise InfuseError("The tokenizer corpus is empty: the files given hold no text.")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        max_token_length=max_token_length,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1_000_000,
    )
    wrapped.chat_template = CHATML_TEMPLATE
    wrapped.save_pretrained(str(output))
    return wrapped
