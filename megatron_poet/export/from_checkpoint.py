"""Convert a checkpoint of the training program to a Hugging Face model directory.

Steps (single process, CPU, whatever TP size the run used):

1. find ``iter_XXXXXXX``, verify it against its manifest and read the run's model arguments
   safely, through the checkpoint's format (:mod:`megatron_poet.checkpoint`: megatron
   ``dist_checkpointing`` or DeepSpeed, any ZeRO stage);
2. rebuild the run's model with the training program's own ``build_model`` at
   TP=1 / PP=1 in the run's dtype, with the checkpoint's padded vocabulary size (it depends
   on the training TP size, so the format reads it from the stored embedding);
3. load the model tensors (``dist_checkpointing`` reshards TP>1 -> 1);
4. refuse non-finite tensors (a diverged run's checkpoint) unless told otherwise;
5. fold POET layers (fp32 products), map names and layouts, write the Hugging Face files — a transformer
   layer at a time, each layer's ``A0`` freed once folded (:func:`~.hf_export.export_gpt_model`).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from ..checkpoint import SHAPE_ARGS, CheckpointReadError, format_of, resolve_checkpoint, saved_shape_args
from ..poet.linear import POETModule
from ..training.finite import describe, nonfinite_tensors
from .hf_export import TokenizerInfo, export_gpt_model
from .spec import ExportSpec

# Saved arguments the export cannot do without (they fix the model's shape).
REQUIRED_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size_unpadded")
# The other arguments that define the model's function; when a checkpoint lacks one,
# the training program's default is assumed and reported.
FUNCTION_ARGS = tuple(a for a in SHAPE_ARGS if a not in REQUIRED_ARGS)


@dataclass
class ConversionResult:
    """What :func:`convert_checkpoint` did.

    Attributes:
        spec: the exported model's :class:`ExportSpec`.
        checkpoint: the ``iter_XXXXXXX`` directory read; ``iteration`` its number.
        poet_layers: POET layers folded into dense weights (0 for a ``--no-poet`` run).
        assumed: ``{argument: default}`` for arguments the checkpoint did not record.
        tokenizer: the tokenizer copied (``None``: none written).
    """

    spec: ExportSpec
    checkpoint: str
    iteration: int | None
    poet_layers: int
    assumed: dict = field(default_factory=dict)
    tokenizer: str | None = None


def run_arguments(saved: dict) -> tuple[argparse.Namespace, dict]:
    """The training program's arguments for rebuilding the run's model at TP=1 (in the run's dtype).

    Starts from the training parser's defaults and applies the saved values.
    Returns ``(args, assumed)`` where ``assumed`` lists the :data:`FUNCTION_ARGS`
    the checkpoint did not record, with the default used.
    """
    from megatron_poet.training.arguments import build_parser

    missing = [k for k in REQUIRED_ARGS if k not in saved]
    if missing:
        raise CheckpointReadError(f"checkpoint arguments lack {missing}; it was not written by the training program")
    args = build_parser().parse_args([])
    # Older checkpoints: the architecture they were built with, where they record none.
    vars(args).update({k: v for k, v in saved_shape_args(saved).items() if k not in saved and v is not None})
    assumed = {k: getattr(args, k) for k in FUNCTION_ARGS if k not in saved and hasattr(args, k)}
    vars(args).update(saved)
    # One unsharded copy in this process, in the run's own dtype (what its checkpoint holds, so A0 takes no
    # more room than in training; fp32 for checkpoints that record no dtype); folding P A0 R computes in
    # fp32 a layer at a time. A run that kept an fp32 master of A0 saved that master as A0: rebuilt in fp32.
    if args.poet_fp32_master_a0:
        args.bf16 = args.poet_fp32_master_a0 = False
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = args.expert_model_parallel_size = 1
    args.virtual_pipeline_model_parallel_size = None
    args.sequence_parallel = False
    args.world_size = 1
    return args, assumed


def _tokenizer(args: argparse.Namespace, override: str | None) -> TokenizerInfo:
    """Tokenizer to ship: ``override``, else the one the run recorded; a NullTokenizer run ships none."""
    path = override or getattr(args, "tokenizer_model", None)
    if getattr(args, "tokenizer_type", None) == "NullTokenizer" and override is None:
        # Megatron's NullTokenizer: ids 0..n-1 plus eod = n, so vocab_size_unpadded = n + 1.
        eod = args.vocab_size_unpadded - 1
        return TokenizerInfo(vocab_size=args.vocab_size_unpadded, eos_token_id=eod)
    if not path:
        raise CheckpointReadError("the checkpoint does not record its tokenizer; pass --tokenizer PATH "
                                  "(the tokenizer.json or tokenizer directory used for training)")
    if not os.path.exists(path):
        raise CheckpointReadError(f"the run's tokenizer {path} no longer exists; pass --tokenizer PATH")
    info = TokenizerInfo.from_path(path)
    if info.vocab_size != args.vocab_size_unpadded:
        raise CheckpointReadError(
            f"tokenizer {path} has {info.vocab_size} tokens but the model was trained with "
            f"{args.vocab_size_unpadded}; pass the tokenizer used for training")
    return info


def _check_finite(model, path: str) -> None:
    found = nonfinite_tensors((*model.named_parameters(), *model.named_buffers()))
    if found:
        raise CheckpointReadError(
            f"{path} holds non-finite values (NaN/inf) in {len(found)} tensors: {describe(found)}; it comes from a "
            f"diverged run: export an earlier checkpoint (--iteration N), or pass --allow-non-finite to export it "
            f"anyway")


def convert_checkpoint(load: str, output: str, *, iteration: int | None = None, dtype: str = "fp32",
                       tokenizer: str | None = None, max_shard_size: str | int = "5GB",
                       progress: bool = True, allow_non_finite: bool = False) -> ConversionResult:
    """Convert a training checkpoint to a Hugging Face directory (see the module docstring).

    Args:
        load: the run's ``--save`` directory (or one ``iter_XXXXXXX`` directory).
        output: Hugging Face model directory to write.
        iteration: which checkpoint; default: the latest.
        dtype: "fp32", "bf16" or "fp16" storage (folding is always fp32).
        tokenizer: tokenizer to ship instead of the one the run recorded.
        max_shard_size: shard the safetensors above this size.
        progress: tqdm progress bars.
        allow_non_finite: export even if the checkpoint's tensors or the folded weights hold NaN or
            inf, or its POET factors are far from orthogonal.
    Raises:
        CheckpointReadError: unreadable / incomplete / unsafe checkpoint, non-finite tensors
            (unless ``allow_non_finite``), missing tokenizer.
        UnsupportedModelError: a model option Hugging Face cannot reproduce.
    """
    from megatron_poet.megatron.cpu_backend import single_process

    path, iteration = resolve_checkpoint(load, iteration)
    checkpoint = format_of(path)
    damaged = checkpoint.verify(path, checksums=False)
    if damaged:
        raise CheckpointReadError(f"checkpoint {path} is damaged: {'; '.join(damaged[:3])}; export another "
                                  f"checkpoint (--iteration N)")
    saved = checkpoint.read_args(path)
    if not isinstance(saved, dict):
        raise CheckpointReadError(f"{path} records no model arguments ('args'); it was not written by the "
                                  f"training program")
    args, assumed = run_arguments(saved)
    token_info = _tokenizer(args, tokenizer)
    padded_vocab = checkpoint.padded_vocab_size(path)

    with single_process(seed=getattr(args, "seed", 1234)):
        from megatron_poet.training.model_provider import build_model

        model = build_model(args, padded_vocab).eval()
        poet_layers = sum(isinstance(m, POETModule) for m in model.modules())
        checkpoint.load_model_weights(model, path)
        if not allow_non_finite:
            _check_finite(model, path)
        spec = export_gpt_model(model, output, tokenizer=token_info, dtype=dtype, max_shard_size=max_shard_size,
                                progress=progress, check=not allow_non_finite, release_model=True)
    return ConversionResult(spec, path, iteration, poet_layers, assumed, token_info.path)
