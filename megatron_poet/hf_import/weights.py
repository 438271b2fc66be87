"""Read a Hugging Face checkpoint's tensors with ``safetensors`` (no pickle), sharded or not."""
from __future__ import annotations

import glob
import json
import os

import torch

from .config import HFImportError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "*.pt", "*.pth", "*.ckpt")
# Buffers some checkpoints store that are not weights (recomputed by both frameworks).
NOT_WEIGHTS = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def safetensors_files(hf_dir: str) -> dict[str, list[str]]:
    """``{file: [tensor names it should hold]}`` of ``hf_dir`` (one file, or the shards of its index).

    Raises :class:`HFImportError` for a pickle checkpoint (refused: unpickling runs code), a missing
    shard, or an unreadable index.
    """
    index_path = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise HFImportError(f"{index_path} is not a safetensors index ({err})") from None
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        missing = sorted(f for f in files if not os.path.isfile(os.path.join(hf_dir, f)))
        if missing:
            raise HFImportError(f"{hf_dir}: shard(s) listed in {INDEX} are missing: {', '.join(missing)} (holding "
                                f"{sum(len(files[f]) for f in missing)} tensors, e.g. {files[missing[0]][0]}); "
                                f"download them again")
        return files
    if os.path.isfile(os.path.join(hf_dir, SINGLE)):
        return {SINGLE: []}
    pickles = sorted({os.path.basename(p) for pattern in PICKLES for p in glob.glob(os.path.join(hf_dir, pattern))})
    if pickles:
        raise HFImportError(
            f"{hf_dir} holds its weights as pickle files ({', '.join(pickles)}), which are refused: loading a pickle "
            f"can run arbitrary code. Convert them to safetensors where you trust them, e.g. "
            f"AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)")
    raise HFImportError(f"{hf_dir} has no {SINGLE} or {INDEX}: no weights to import")


def read_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``hf_dir`` by name, in its stored dtype, buffers that are not
    weights left out; GPT-2's old unprefixed names (``h.0...``) get their ``transformer.`` prefix."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file, expected in safetensors_files(hf_dir).items():
        path = os.path.join(hf_dir, file)
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as err:
            raise HFImportError(f"{path} is not a readable safetensors file ({err}); download it again") from None
        absent = sorted(set(expected) - set(tensors))
        if absent:
            raise HFImportError(f"{path} lacks tensors its index assigns to it: {absent[:5]}")
        state.update(tensors)
    state = {name: t for name, t in state.items() if not name.endswith(NOT_WEIGHTS)}
    if "wte.weight" in state:  # GPT-2 checkpoints saved from GPT2Model, or the original release
        state = {(name if name.startswith("lm_head.") else f"transformer.{name}"): t for name, t in state.items()}
    return state
