"""lmforge: train and fine-tune language models from one YAML file."""

__version__ = "0.1.0"
