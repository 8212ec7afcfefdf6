"""lorascope: what LoRA buys and what it costs compared with full fine-tuning."""

__version__ = "0.1.0"
