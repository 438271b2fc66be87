"""Export a megatron-core ``GPTModel`` (POET or not, built at TP=1) to a Hugging Face directory."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .fold import dense_state_dict
from .hf_gpt2 import gpt2_config, gpt2_state_dict
from .hf_llama import llama_config, llama_state_dict
from .spec import ExportSpec
from .writer import DTYPES, copy_tokenizer, write_config, write_generation_config, write_safetensors


@dataclass(frozen=True)
class TokenizerInfo:
    """What the export takes from the training tokenizer.

    Attributes:
        vocab_size: true vocabulary size (megatron's padding beyond it is trimmed).
        eos_token_id, bos_token_id, pad_token_id: special ids for config / generation config.
        path: tokenizer.json or tokenizer directory to copy; ``None`` (e.g. a
            NullTokenizer run) writes no tokenizer files.
        eos_token: end-of-document token string (for a bare tokenizer.json).
    """

    vocab_size: int
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    path: str | None = None
    eos_token: str | None = None

    @classmethod
    def from_path(cls, path: str) -> "TokenizerInfo":
        """Read a Hugging Face tokenizer (file or directory) the way the training program does."""
        from ..data.tokenizer import load_hf_tokenizer

        tok = load_hf_tokenizer(path)
        bos = None
        config_path = os.path.join(path, "tokenizer_config.json")
        if os.path.isdir(path) and os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                value = json.load(f).get("bos_token")
            name = value.get("content") if isinstance(value, dict) else value
            bos = tok.backend.token_to_id(name) if name else None
        try:
            pad = tok.pad
        except AttributeError:
            pad = None
        return cls(vocab_size=tok.vocab_size, eos_token_id=tok.eod, bos_token_id=bos, pad_token_id=pad,
                   path=path, eos_token=tok.eod_token)


def _progress(enabled: bool, desc: str, unit: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda items: tqdm(items, desc=desc, unit=unit)


def hf_state_and_config(model, tokenizer: TokenizerInfo | None, progress: bool = False):
    """Fold and map a TP=1 ``GPTModel`` to a Hugging Face state dict and config (nothing written).

    Returns:
        ``(spec, config, state)``: the :class:`ExportSpec`, a ``LlamaConfig`` /
        ``GPT2Config`` and ``{hf name: float32 tensor}``.
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        raise ValueError("export folds full weights: build the model at tensor_model_parallel_size=1 "
                         "(loading a TP>1 checkpoint into it reshards)")
    spec = ExportSpec.from_gpt_model(model, tokenizer.vocab_size if tokenizer else None)
    ids = dict(bos_token_id=tokenizer.bos_token_id if tokenizer else None,
               eos_token_id=tokenizer.eos_token_id if tokenizer else None,
               pad_token_id=tokenizer.pad_token_id if tokenizer else None)
    dense = dense_state_dict(model, _progress(progress, "folding POET layers", "layer"))
    if spec.architecture == "llama":
        return spec, llama_config(spec, **ids), llama_state_dict(dense, spec)
    return spec, gpt2_config(spec, **ids), gpt2_state_dict(dense, spec)


def export_gpt_model(model, out_dir: str, *, tokenizer: TokenizerInfo | None = None, dtype: str = "fp32",
                     max_shard_size: str | int = "5GB", progress: bool = False) -> ExportSpec:
    """Write ``model`` as a Hugging Face model directory.

    Args:
        model: megatron-core ``GPTModel`` at TP=1 (POET layers are folded to ``P A0 R`` in fp32).
        out_dir: created if missing; old model files in it are replaced.
        tokenizer: vocabulary size, special ids and files; ``None`` keeps the padded
            vocabulary and writes no tokenizer.
        dtype: "fp32", "bf16" or "fp16": storage dtype (the cast happens after folding).
        max_shard_size: above this the weights are sharded with an index (e.g. "5GB").
        progress: show tqdm progress bars.
    Returns:
        The model's :class:`ExportSpec`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    spec, config, state = hf_state_and_config(model, tokenizer, progress)
    state = {k: v.to(torch_dtype) for k, v in state.items()}
    os.makedirs(out_dir, exist_ok=True)
    # transformers < 5 reads the rotary base from a top-level rope_theta.
    extra = {"rope_theta": spec.rope_theta} if spec.rope_theta is not None else None
    write_config(out_dir, config, torch_dtype, extra)
    write_generation_config(out_dir, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                            pad_token_id=config.pad_token_id)
    write_safetensors(out_dir, state, max_shard_size, _progress(progress, "writing safetensors", "shard"))
    if tokenizer is not None and tokenizer.path is not None:
        copy_tokenizer(tokenizer.path, out_dir, tokenizer.eos_token)
    return spec
