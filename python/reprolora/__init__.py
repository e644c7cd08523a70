"""reprolora: LoRA fine-tuning on CPU whose output bytes are the same wherever it is rebuilt."""

__version__ = "0.1.0"
