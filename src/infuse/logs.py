"""Keep library chatter off the terminal so infuse's own progress and errors stay readable."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries(debug: bool = False) -> None:
    """Library warnings at error level (all of them with ``--debug``)."""
    if debug:
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    for name in ("bitsandbytes", "peft", "accelerate", "datasets", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.checkpoint")
    warnings.filterwarnings("ignore", category=FutureWarning)


class HideMissingKernelsNotice(logging.Filter):
    """bitsandbytes warns on import, on CPUs with AVX-512 BF16, that the optional ``kernels``
    package (a faster 4-bit CPU kernel fetched from the Hub) is missing. It falls back to its own
    kernel and nothing is wrong, so the line only confuses; every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")
