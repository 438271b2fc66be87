"""Hugging Face in: a released Llama-family or GPT-2 model becomes a checkpoint of this stack whose POET
layers hold the pretrained weights as ``A0`` with identity factors (:func:`convert_hf_model`), ready
for continued pretraining with ``--load CKPT --finetune --use-checkpoint-args``."""
from .config import HFImportError, training_flags
from .convert import ImportResult, convert_hf_model

__all__ = ["HFImportError", "ImportResult", "convert_hf_model", "training_flags"]
