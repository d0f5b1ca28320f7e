"""higgs-tune: a reproducible LoRA fine-tuning workflow for Boson AI's Higgs Audio v2."""

__version__ = "0.1.0"
