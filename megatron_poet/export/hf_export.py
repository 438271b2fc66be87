"""Export a megatron-core ``GPTModel`` (POET or not, built at TP=1) to a Hugging Face directory."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from .fold import dense_layer_states
from .hf_gpt2 import gpt2_config, gpt2_state_chunks
from .hf_llama import llama_config, llama_state_chunks, mixtral_config
from .spec import ExportSpec
from .writer import DTYPES, copy_tokenizer, parse_size, write_config, write_generation_config, write_safetensors


@dataclass(frozen=True)
class TokenizerInfo:
    """What the export takes from the training tokenizer.

    Attributes:
        vocab_size: true vocabulary size (megatron's padding beyond it is trimmed).
        eos_token_id, bos_token_id, pad_token_id: special ids for config / generation config
            (``eos_token_id`` may be a list, as in Llama-3.1's config).
        path: tokenizer.json or tokenizer directory to copy; ``None`` (e.g. a
            NullTokenizer run) writes no tokenizer files.
        eos_token: end-of-document token string (for a bare tokenizer.json).
        generation_config: a ``generation_config.json`` to ship as it is (an imported model's).
    """

    vocab_size: int
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    path: str | None = None
    eos_token: str | None = None
    generation_config: str | None = None

    @classmethod
    def from_path(cls, path: str) -> "TokenizerInfo":
        """Read a Hugging Face tokenizer (file or directory) the way the training program does.

        A directory that also holds a model's ``config.json`` (an imported model's ``hf/``, see
        :mod:`megatron_poet.hf_import`) gives the original's special ids and generation config."""
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
        ids = dict(eos_token_id=tok.eod, bos_token_id=bos, pad_token_id=pad)
        model_config = os.path.join(path, "config.json")
        if os.path.isdir(path) and os.path.isfile(model_config):
            with open(model_config, encoding="utf-8") as f:
                original = json.load(f)
            ids = {key: original.get(key) for key in ids}
        generation = os.path.join(path, "generation_config.json")
        return cls(vocab_size=tok.vocab_size, **ids, path=path, eos_token=tok.eod_token,
                   generation_config=generation if os.path.isfile(generation) else None)


def _progress(enabled: bool, desc: str, unit: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda items: tqdm(items, desc=desc, unit=unit)


def hf_state_chunks(model, tokenizer: TokenizerInfo | None, progress: bool = False, *,
                    dtype: torch.dtype | None = None, release: bool = False):
    """Fold and map a TP=1 ``GPTModel`` to Hugging Face tensors and config, a transformer layer at a time
    (nothing written; each layer is folded when the iterator reaches it).

    ``dtype`` and ``release``: as :func:`~.fold.dense_state_dict` (default float32, the model intact).

    Returns:
        ``(spec, config, chunks)``: the :class:`ExportSpec`, a ``LlamaConfig`` / ``MixtralConfig`` /
        ``GPT2Config`` and an iterator of ``{hf name: tensor}`` (embeddings, each layer, final norm and head).
    """
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized() and parallel_state.get_tensor_model_parallel_world_size() > 1:
        raise ValueError("export folds full weights: build the model at tensor_model_parallel_size=1 "
                         "(loading a TP>1 checkpoint into it reshards)")
    spec = ExportSpec.from_gpt_model(model, tokenizer.vocab_size if tokenizer else None)
    ids = dict(bos_token_id=tokenizer.bos_token_id if tokenizer else None,
               eos_token_id=tokenizer.eos_token_id if tokenizer else None,
               pad_token_id=tokenizer.pad_token_id if tokenizer else None)
    if len(model.decoder.layers) != spec.num_layers:
        raise ValueError(f"the model holds {len(model.decoder.layers)} transformer layers, its config "
                         f"{spec.num_layers}: export a whole model (pipeline-parallel size 1)")
    outer, layers = dense_layer_states(model, _progress(progress, "exporting layers", "layer"), dtype=dtype,
                                       release=release)
    if spec.architecture in ("llama", "mixtral"):
        config = (mixtral_config if spec.num_experts else llama_config)(spec, **ids)
        return spec, config, llama_state_chunks(outer, layers, spec)
    return spec, gpt2_config(spec, **ids), gpt2_state_chunks(outer, layers, spec)


def hf_state_and_config(model, tokenizer: TokenizerInfo | None, progress: bool = False, *,
                        dtype: torch.dtype | None = None, release: bool = False):
    """:func:`hf_state_chunks` as one state dict: ``(spec, config, {hf name: tensor})``."""
    spec, config, chunks = hf_state_chunks(model, tokenizer, progress, dtype=dtype, release=release)
    return spec, config, {name: tensor for chunk in chunks for name, tensor in chunk.items()}


class UnsafeWeightsError(ValueError):
    """The folded weights would not be a model: non-finite values, or factors far from orthogonal."""


def check_factors(model) -> None:
    """Raise :class:`UnsafeWeightsError` unless every POET factor of ``model`` is within
    ``MAX_ORTHOGONALITY_ERROR`` of orthogonal (names the offending layers)."""
    from ..poet.cayley import MAX_ORTHOGONALITY_ERROR
    from ..poet.linear import POETModule

    errors = [(name, float(m.orthogonality_error())) for name, m in model.named_modules() if isinstance(m, POETModule)]
    far = [(name, e) for name, e in errors if not e <= MAX_ORTHOGONALITY_ERROR]
    if far:
        listed = ", ".join(f"{name} ({e:.3g})" for name, e in far[:6]) + (f" and {len(far) - 6} more" if len(far) > 6 else "")
        _refuse(f"{len(far)} POET layers have factors past orthogonality error {MAX_ORTHOGONALITY_ERROR:g} "
                f"(||G^T G - I||_F): {listed}; folding them would change the weights' singular values")


def check_folded(state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Raise :class:`UnsafeWeightsError` unless every tensor of ``state`` cast to ``dtype`` is finite (values
    beyond its range show as inf); names the offending tensors."""
    from ..training.finite import describe, nonfinite_tensors

    found = nonfinite_tensors((name, tensor.to(dtype)) for name, tensor in state.items())
    if found:
        _refuse(f"{len(found)} folded weights are not finite in {str(dtype).removeprefix('torch.')}: {describe(found)}")


def _refuse(problem: str) -> None:
    raise UnsafeWeightsError(f"refusing to export a diverged model: {problem}; export an earlier checkpoint, or pass "
                             f"--allow-non-finite to export it anyway")


def export_gpt_model(model, out_dir: str, *, tokenizer: TokenizerInfo | None = None, dtype: str = "fp32",
                     max_shard_size: str | int = "5GB", progress: bool = False, check: bool = True,
                     release_model: bool = False) -> ExportSpec:
    """Write ``model`` as a Hugging Face model directory.

    Args:
        model: megatron-core ``GPTModel`` at TP=1 (POET layers are folded to ``P A0 R`` in fp32).
        out_dir: created if missing; old model files in it are replaced.
        tokenizer: vocabulary size, special ids and files; ``None`` keeps the padded
            vocabulary and writes no tokenizer.
        dtype: "fp32", "bf16" or "fp16": storage dtype (the cast happens after folding).
        max_shard_size: above this the weights are sharded with an index (e.g. "5GB").
        progress: show a tqdm progress bar over the layers.
        check: refuse (:class:`UnsafeWeightsError`; ``out_dir`` is left as it was) folded weights that are
            not finite in ``dtype`` or come from factors far from orthogonal (:func:`check_factors`, :func:`check_folded`).
        release_model: free each POET layer's ``A0`` once folded (for a caller done with ``model``).

    Streamed: each transformer layer is folded, mapped, checked and cast when the writer reaches it, and
    a shard is written once full (:func:`~.writer.write_safetensors`), so the export holds at most one
    shard of dense weights beside the model — with ``release_model``, the model's folded layers give
    their ``A0`` back as the dense weights are formed.
    Returns:
        The model's :class:`ExportSpec`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    parse_size(max_shard_size)  # a bad size fails before any folding
    if check:  # before folding: a released layer has no factors left to measure
        check_factors(model)
    spec, config, chunks = hf_state_chunks(model, tokenizer, progress, dtype=torch_dtype, release=release_model)

    def checked(chunk):
        if check:
            check_folded(chunk, torch_dtype)
        return {k: v.to(torch_dtype) for k, v in chunk.items()}

    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    # Weights first: a refusal midway leaves out_dir as it was (write_safetensors stages its shards).
    try:
        write_safetensors(out_dir, map(checked, chunks), max_shard_size)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    # transformers < 5 reads the rotary base and scaling from top-level rope_theta / rope_scaling.
    extra = {"rope_theta": spec.rope_theta, "rope_scaling": spec.rope_scaling} if spec.rope_theta is not None else None
    write_config(out_dir, config, torch_dtype, extra)
    if tokenizer is not None and tokenizer.generation_config:
        shutil.copyfile(tokenizer.generation_config, os.path.join(out_dir, "generation_config.json"))
    else:
        write_generation_config(out_dir, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                pad_token_id=config.pad_token_id)
    if tokenizer is not None and tokenizer.path is not None:
        copy_tokenizer(tokenizer.path, out_dir, tokenizer.eos_token)
    return spec
