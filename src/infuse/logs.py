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
