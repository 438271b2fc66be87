"""Export trained megatron-core / POET models to Hugging Face format.

- :mod:`.spec`: :class:`ExportSpec`, the model options read off a ``GPTModel`` (unsupported ones rejected).
- :mod:`.fold`: POET layers -> dense ``P A0 R`` (float32).
- :mod:`.layout`, :mod:`.hf_llama`, :mod:`.hf_gpt2`: megatron names and layouts -> Hugging Face.
- :mod:`.writer`: config.json, generation_config.json, (sharded) safetensors, tokenizer files.
- :mod:`.hf_export`: :func:`export_gpt_model`, the whole export of an in-memory model.
"""
from .hf_export import TokenizerInfo, export_gpt_model, hf_state_and_config
from .spec import ExportSpec, UnsupportedModelError

__all__ = ["ExportSpec", "TokenizerInfo", "UnsupportedModelError", "export_gpt_model", "hf_state_and_config"]
