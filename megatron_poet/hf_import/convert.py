"""Convert a Hugging Face model directory into a checkpoint of this stack (one process, CPU).

Steps, everything checked before anything is written:

1. ``config.json`` -> the training program's model flags (:func:`.config.training_flags`), joined with
   the caller's flags (POET options, ``--no-poet``, ``--tensor-model-parallel-size``,
   ``--pipeline-model-parallel-size``) and validated by the training program's own argument checks
   (block sizes on every rank's shard, TP divisibility);
2. the tokenizer (the model directory's, or ``tokenizer``) must have the model's vocabulary;
3. the weights, read with ``safetensors`` (sharded with their index, or one file), mapped to megatron's
   names (the exporter's mappings, inverted) and every one consumed;
4. the model is built at TP=1 as the training program builds it; each POET layer starts from its
   pretrained weight (``A0`` = the weight in the layer's pre-permuted layout, identity factors), every
   other parameter is copied; the vocabulary is padded for the requested TP size with zero rows;
5. a model-only megatron ``dist_checkpointing`` checkpoint ``iter_0000000`` (layout-independent: it
   loads at any TP/PP), its manifest and marker, and ``hf/`` (the Hugging Face directory's tokenizer
   files, ``config.json`` and ``generation_config.json``, the weights left out) are written into a
   temporary directory beside ``output``, which is renamed to ``output`` only when complete.

Train from it with ``--load OUTPUT --finetune --use-checkpoint-args`` (model weights only; iteration,
optimizer and schedule start anew; the model flags and tokenizer come from the checkpoint).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch

from .config import HFImportError, read_config, training_flags
from .weights import read_weights

HF_FILES = ("config.json", "generation_config.json")
ITERATION = 0


@dataclass
class ImportResult:
    """What :func:`convert_hf_model` wrote.

    Attributes:
        output: the checkpoint root (``--load`` it); ``flags``: the model flags it records.
        architecture: "llama" or "gpt2"; ``poet_layers``: layers that start from a pretrained weight
        as ``A0`` (0 with ``--no-poet``); ``parameters``: weights imported.
    """

    output: str
    flags: list[str]
    architecture: str
    poet_layers: int
    parameters: int


def _parse(hf_dir: str, model_flags: list[str], flags: list[str], tokenizer: str) -> argparse.Namespace:
    from megatron_poet.training.arguments import ArgumentError, build_parser, parse_args

    argv = model_flags + ["--seq-length", "128", "--tokenizer-model", tokenizer, *flags]
    known = build_parser().parse_args(argv)
    try:
        return parse_args(argv, world_size=known.tensor_model_parallel_size * known.pipeline_model_parallel_size)
    except ArgumentError as err:
        raise HFImportError(f"{hf_dir} cannot be trained with these flags: {err}") from None


def _check_tokenizer(path: str, vocab_size: int) -> None:
    from megatron_poet.data.tokenizer import load_hf_tokenizer

    try:
        found = load_hf_tokenizer(path).vocab_size
    except (OSError, ValueError) as err:
        raise HFImportError(f"the tokenizer at {path} cannot be read ({err}); pass --tokenizer PATH") from None
    if found != vocab_size:
        raise HFImportError(f"the tokenizer at {path} has {found} tokens but the model's vocabulary is {vocab_size}; "
                            f"the stack's vocabulary is the tokenizer's, so they must agree")


def _copy_hf_files(hf_dir: str, tokenizer: str, out_dir: str) -> None:
    from megatron_poet.export.writer import copy_tokenizer

    os.makedirs(out_dir)
    copy_tokenizer(tokenizer, out_dir)
    for name in HF_FILES:
        if os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(out_dir, name))


def convert_hf_model(hf_dir: str, output: str, flags: list[str] = (), tokenizer: str | None = None) -> ImportResult:
    """Convert Hugging Face model directory ``hf_dir`` into checkpoint root ``output`` (see the module docstring).

    Args:
        flags: training-program flags for the model's layout and POET (``--poet-block-size 64``,
            ``--no-poet``, ``--tensor-model-parallel-size 2``, ...); model-shape flags come from ``config.json``.
        tokenizer: tokenizer directory or file to ship instead of ``hf_dir``'s.
    Raises :class:`HFImportError` (nothing written) for what cannot be imported as asked.
    """
    from megatron_poet.checkpoint import recorded_args
    from megatron_poet.export.spec import ExportSpec

    config = read_config(hf_dir)
    model_flags = training_flags(config)
    tokenizer = tokenizer or hf_dir
    vocab_size = config.get("vocab_size")
    if not isinstance(vocab_size, int):
        raise HFImportError(f"{hf_dir}/config.json gives no vocab_size")
    if os.path.exists(output):
        raise HFImportError(f"{output} exists; give a new directory (the import never writes into an existing one)")
    _check_tokenizer(tokenizer, vocab_size)
    args = _parse(hf_dir, model_flags, list(flags), tokenizer)
    args.vocab_size_unpadded = vocab_size
    hf_state = read_weights(hf_dir)

    from megatron_poet.megatron.cpu_backend import single_process

    with single_process(args.seed):
        model, padded = _build(args)
        spec = ExportSpec.from_gpt_model(model, vocab_size)
        dense = _megatron_state(hf_dir, hf_state, spec)
        from megatron_poet.export.fold import load_dense_state_dict

        try:
            load_dense_state_dict(model, dense)
        except ValueError as err:
            raise HFImportError(f"{hf_dir}: {err}") from None
        parent = os.path.dirname(os.path.abspath(output))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", dir=parent)
        try:
            args.tokenizer_type, args.tokenizer_model = "HuggingFaceTokenizer", os.path.join(os.path.abspath(output), "hf")
            args.padded_vocab_size = padded
            _save(model, staging, recorded_args(args), os.path.abspath(hf_dir))
            _copy_hf_files(hf_dir, tokenizer, os.path.join(staging, "hf"))
            os.rename(staging, output)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    from megatron_poet.poet.linear import POETModule

    poet_layers = sum(isinstance(m, POETModule) for m in model.modules())
    return ImportResult(output, model_flags, spec.architecture, poet_layers, sum(t.numel() for t in dense.values()))


def _megatron_state(hf_dir: str, hf_state: dict[str, torch.Tensor], spec) -> dict[str, torch.Tensor]:
    """Hugging Face names -> megatron's (every tensor consumed), in float32."""
    from megatron_poet.export.hf_gpt2 import gpt2_from_hf
    from megatron_poet.export.hf_llama import llama_from_hf
    from megatron_poet.export.layout import ConsumedState

    source = ConsumedState({k: v.float() for k, v in hf_state.items()}, f"Hugging Face checkpoint {hf_dir}")
    try:
        dense = (llama_from_hf if spec.architecture == "llama" else gpt2_from_hf)(source, spec)
    except (KeyError, ValueError, RuntimeError) as err:
        raise HFImportError(f"{hf_dir}: its weights do not match its config.json: {err}") from None
    left = source.left()
    if left:
        raise HFImportError(f"{hf_dir} has tensors with no place in a {spec.architecture}-style model (unsupported "
                            f"parts): {left[:8]}{' ...' if len(left) > 8 else ''}")
    return dense


def _build(args: argparse.Namespace):
    """The run's model at TP=1 in fp32, its vocabulary padded for the run's TP size."""
    from megatron_poet.training.model_provider import build_model, padded_vocab_size

    padded = padded_vocab_size(args.vocab_size_unpadded, args)
    local = argparse.Namespace(**vars(args))
    local.tensor_model_parallel_size = local.pipeline_model_parallel_size = 1
    local.virtual_pipeline_model_parallel_size = None
    local.sequence_parallel = local.bf16 = False
    return build_model(local, padded).eval(), padded


def _save(model, path: str, recorded: dict, source: str) -> None:
    from megatron.core import dist_checkpointing

    from megatron_poet.checkpoint import checkpoint_dir, write_marker
    from megatron_poet.checkpoint.manifest import write_manifest
    from megatron_poet.megatron.layer_checkpoint import canonical_a0
    from megatron_poet.training.process import prepare_checkpoint_results_queue

    prepare_checkpoint_results_queue(background_saves=False)  # else megatron spawns a Manager process

    target = checkpoint_dir(path, ITERATION)
    os.makedirs(target)
    with canonical_a0(model):  # no second copy of the model's A0s
        state = {"model": model.sharded_state_dict(), "args": recorded, "iteration": ITERATION, "consumed_samples": 0,
                 "model_only": True, "converted_from": source, "layout": (1, 1, 1), "merge_scheduler": None}
        dist_checkpointing.save(state, target)
    write_manifest(target)
    write_marker(path, ITERATION)
