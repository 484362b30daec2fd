"""xtune: fine-tune large language and vision-language models."""

__version__ = "0.1.0"
