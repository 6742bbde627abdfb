"""Keep library chatter off the terminal so infuse's own progress and errors stay readable."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager


def quiet_libraries(debug: bool = False) -> None:
    """Library warnings at error level (all of them with ``--debug``)."""
    if debug:
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    for name in ("bitsandbytes", "peft", "accelerate", "datasets", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # pypdf logs what it finds wrong in a damaged file as it reads it; ingest reports each PDF it
    # cannot read, with the reason, in its own report.
    logging.getLogger("pypdf").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.checkpoint")
    warnings.filterwarnings("ignore", category=FutureWarning)


def library_bars_only_in_a_terminal() -> None:
    """transformers' and datasets' tqdm bars draw each update with a carriage return: in a log
    file every one of them stays, so they are off where stderr is not a terminal."""
    if sys.stderr.isatty():
        return
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()


class HideMissingKernelsNotice(logging.Filter):
    """bitsandbytes warns on import, on CPUs with AVX-512 BF16, that the optional ``kernels``
    package (a faster 4-bit CPU kernel fetched from the Hub) is missing. It falls back to its own
    kernel and nothing is wrong, so the line only confuses; every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """transformers' weight-loading and datasets' tokenizing bars would interleave with infuse's own
    progress bars (training, evaluation, the demo's stages); they are off inside the block."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_on = datasets.is_progress_bar_enabled()
    hf_on = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if hf_on:
            hf_logging.enable_progress_bar()
