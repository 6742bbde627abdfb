"""infuse: teach a causal language model new knowledge and measure what it gained and lost."""

__version__ = "0.1.0"
