"""infuse: teach a causal language model new knowledge and measure what it gained and lost."""

import logging as _logging

from infuse.logs import HideMissingKernelsNotice as _HideMissingKernelsNotice

__version__ = "0.1.0"

# Installed before anything imports bitsandbytes, which logs the notice at import time.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_HideMissingKernelsNotice())
