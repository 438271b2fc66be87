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
import tempfile
from typing import Iterable

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


_SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}  # huggingface_hub's decimal units


def parse_size(size: str | int) -> int:
    """Bytes in ``size``: a number, or a string such as ``"5GB"`` / ``"500MB"`` (decimal units, as
    ``huggingface_hub`` reads ``max_shard_size``). Raises ``ValueError`` for anything else."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(TB|GB|MB|KB|B)?\s*", str(size), re.IGNORECASE)
    if not match or float(match[1]) <= 0:
        raise ValueError(f"cannot plan shards of {size!r}; use e.g. 5GB, 500MB or a number of bytes")
    return int(float(match[1]) * _SIZE_UNITS[(match[2] or "B").upper()])


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    # safetensors refuses non-contiguous tensors (GPT-2's transposed Conv1D weights) and tensors sharing
    # storage (e.g. Q/K/V slices of one fused tensor): copy any tensor that is not the whole of its storage.
    save_file({k: v.clone(memory_format=torch.contiguous_format)
               if not v.is_contiguous() or v.untyped_storage().nbytes() != v.nbytes else v
               for k, v in tensors.items()}, path, metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~_umask())  # safetensors creates its files 0600; give the usual permissions


def write_safetensors(out_dir: str, chunks: Iterable[dict[str, torch.Tensor]],
                      max_shard_size: str | int = "5GB") -> list[str]:
    """Write the tensors of ``chunks`` (e.g. one transformer layer each) as ``model.safetensors``, or as
    ``model-0000k-of-0000n.safetensors`` shards plus ``model.safetensors.index.json`` when they exceed
    ``max_shard_size`` — streamed: a shard is written as soon as the next tensor would overflow it, so
    this holds at most one shard's tensors (each tensor larger than a shard gets a shard of its own, as
    ``huggingface_hub``'s planner does).

    Nothing in ``out_dir`` changes until every chunk is written (the shards go to a hidden directory first;
    an exception from ``chunks``, e.g. a refusal, leaves ``out_dir`` as it was); then stale model files are
    removed (and the staging directories of interrupted exports), so an index never coexists with an old
    single file. Returns the files written.
    """
    limit = parse_size(max_shard_size)
    staging = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        shards: list[list[str]] = []  # names per shard written, in order
        pending, pending_bytes, total = {}, 0, 0

        def flush():
            _save(pending, os.path.join(staging, f"{len(shards):05d}"))
            shards.append(list(pending))
            pending.clear()

        for chunk in chunks:
            for name, tensor in chunk.items():
                size = tensor.numel() * tensor.element_size()
                if pending and pending_bytes + size > limit:
                    flush()
                    pending_bytes = 0
                pending[name] = tensor
                pending_bytes += size
                total += size
        if pending or not shards:
            flush()
        names = [SAFETENSORS_SINGLE] if len(shards) == 1 else [
            f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        for stale in os.listdir(out_dir):
            if _SHARD_PATTERN.match(stale):
                os.remove(os.path.join(out_dir, stale))
            elif stale.startswith(".export-") and os.path.join(out_dir, stale) != staging:  # an interrupted export's
                shutil.rmtree(os.path.join(out_dir, stale), ignore_errors=True)
        for k, name in enumerate(names):
            os.replace(os.path.join(staging, f"{k:05d}"), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor in shard}}
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
