"""Write a Hugging Face model directory: config, generation config, safetensors, tokenizer.

Written by hand (not ``PreTrainedModel.save_pretrained``) so the exporter never
has to instantiate the Hugging Face model (twice the memory of the weights) and
the files stay readable by transformers 4.x as well as 5.x.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Callable

import torch

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_SHARD_PATTERN = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?$")
# Tokenizer files transformers' AutoTokenizer reads, copied verbatim when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def write_safetensors(out_dir: str, state: dict[str, torch.Tensor], max_shard_size: str | int = "5GB",
                      progress: Callable | None = None) -> list[str]:
    """Write ``state`` as ``model.safetensors``, or as shards plus ``model.safetensors.index.json``
    when it exceeds ``max_shard_size`` (``"5GB"``, ``"500MB"`` or bytes; planned by ``huggingface_hub``'s
    ``split_torch_state_dict_into_shards``, as ``save_pretrained`` does). Stale model files in
    ``out_dir`` are removed first, so an index never coexists with an old single file. Returns the
    files written.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    for stale in os.listdir(out_dir):
        if _SHARD_PATTERN.match(stale):
            os.remove(os.path.join(out_dir, stale))
    try:
        split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    except ValueError as err:
        raise ValueError(f"cannot plan shards of {max_shard_size!r} ({err}); use e.g. 5GB, 500MB or a number of "
                         f"bytes") from None
    shards = list(split.filename_to_tensors.items())
    for file_name, keys in (progress(shards) if progress else shards):
        # safetensors refuses views sharing storage (e.g. Q/K/V slices of one fused tensor).
        tensors = {k: state[k].contiguous().clone() for k in keys}
        path = os.path.join(out_dir, file_name)
        save_file(tensors, path, metadata={"format": "pt"})
        os.chmod(path, 0o666 & ~_umask())  # safetensors creates its files 0600; give the usual permissions
    names = [name for name, _ in shards]
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        names.append(SAFETENSORS_INDEX)
    return names


def write_config(out_dir: str, config, dtype: torch.dtype, extra: dict | None = None) -> None:
    """``config.json`` from a transformers config, with the storage dtype under both its
    transformers 5 (``dtype``) and 4.x (``torch_dtype``) keys, plus ``extra`` entries."""
    data = config.to_diff_dict()
    data["dtype"] = data["torch_dtype"] = _DTYPE_NAMES[dtype]
    data.update(extra or {})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def write_generation_config(out_dir: str, *, bos_token_id: int | None, eos_token_id: int | None,
                            pad_token_id: int | None = None) -> None:
    """``generation_config.json`` with the tokenizer's special ids (greedy decoding by default)."""
    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                     pad_token_id=pad_token_id).save_pretrained(out_dir)


def copy_tokenizer(source: str, out_dir: str, eos_token: str | None = None) -> list[str]:
    """Copy the training tokenizer's files so ``AutoTokenizer.from_pretrained(out_dir)`` loads it.

    Args:
        source: a tokenizer directory (its known tokenizer files are copied) or a
            bare ``tokenizer.json`` file (copied, plus a minimal ``tokenizer_config.json``
            naming ``eos_token``, because AutoTokenizer needs one to pick the fast class).
        eos_token: the end-of-document token string, for the bare-file case.
    Returns:
        The file names written.
    """
    if os.path.isdir(source):
        copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
        if not copied:
            raise FileNotFoundError(f"tokenizer directory {source} holds none of {list(TOKENIZER_FILES)}")
        for name in copied:
            shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
        return copied
    if not os.path.isfile(source):
        raise FileNotFoundError(f"tokenizer {source} not found")
    shutil.copyfile(source, os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if eos_token is not None:
        config["eos_token"] = eos_token
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return ["tokenizer.json", "tokenizer_config.json"]
