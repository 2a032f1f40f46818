"""prefixserve: one frozen GPT-2 or BART serving many prefix-tuned tasks in shared batches."""

__version__ = "0.1.0"
