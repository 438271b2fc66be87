"""The DeepSpeed engine's flags and the DeepSpeed config of a run, checked before any work.

``--deepspeed --deepspeed-config ds.json`` (Megatron-DeepSpeed's names) or ``--zero-stage N``
(which implies ``--deepspeed``). The config file supplies what is DeepSpeed's own
(``zero_optimization`` and communication settings); what the program's flags already say
is filled in from them when the file leaves it out, and must agree with them when it does not:

=================================  ==========================================
``train_micro_batch_size_per_gpu``  ``--micro-batch-size``
``gradient_accumulation_steps``    global batch / (micro batch x data-parallel size)
``train_batch_size``               ``--global-batch-size``
``gradient_clipping``              ``--clip-grad``
``bf16.enabled``                   ``--bf16``
=================================  ==========================================

(``"auto"`` counts as left out.) The optimizer (AdamW with POET groups) and the LR
schedule come from the program's flags, so a config with an ``optimizer`` or
``scheduler`` section is refused, as are fp16 (loss scaling) and ZeRO-Offload, which the
POET merge does not handle. DeepSpeed is the engine for data parallelism only.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os

ZERO_STAGES = (1, 2, 3)


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed flags or config contradict the run; ``problems`` lists every one."""

    def __init__(self, problems: list[str]):
        super().__init__("\n  ".join(problems))
        self.problems = problems


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``DeepSpeed`` flag group."""
    g = parser.add_argument_group("DeepSpeed")
    g.add_argument("--deepspeed", action="store_true",
                   help="train with DeepSpeed ZeRO (data parallelism only) instead of megatron-core's DDP / "
                        "distributed optimizer")
    g.add_argument("--deepspeed-config", "--deepspeed_config", dest="deepspeed_config", default=None,
                   help="DeepSpeed JSON config (zero_optimization, communication); batch sizes, gradient clipping "
                        "and bf16 come from the flags when it leaves them out and must agree with them otherwise")
    g.add_argument("--zero-stage", type=int, choices=ZERO_STAGES, default=None,
                   help="ZeRO stage (implies --deepspeed); without --deepspeed-config the config is built from the flags")


def _flag_conflicts(args: argparse.Namespace) -> list[str]:
    problems = []
    for flag, value in (("--tensor-model-parallel-size", args.tensor_model_parallel_size),
                        ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size)):
        if value != 1:
            problems.append(f"DeepSpeed is the engine for data parallelism only: {flag} {value} needs the megatron "
                            f"engine (drop --deepspeed/--zero-stage) or size 1")
    megatron_only = (
        ("use_distributed_optimizer", "--use-distributed-optimizer", "ZeRO already shards the optimizer state"),
        ("overlap_grad_reduce", "--overlap-grad-reduce", "DeepSpeed's is zero_optimization.overlap_comm"),
        ("dist_ckpt_optim_fully_reshardable", "--dist-ckpt-optim-fully-reshardable",
         "DeepSpeed writes its own checkpoint format"),
    )
    for name, flag, why in megatron_only:
        if getattr(args, name):
            problems.append(f"{flag} belongs to the megatron engine and cannot be combined with --deepspeed ({why}); "
                            f"drop it")
    if importlib.util.find_spec("deepspeed") is None:
        problems.append('--deepspeed needs the deepspeed package: pip install -e ".[deepspeed]"')
    return problems


def _read_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise DeepSpeedConfigError([f"--deepspeed-config {path}: no such file"])
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise DeepSpeedConfigError([f"--deepspeed-config {path} is not valid JSON: {err}"]) from None
    if not isinstance(config, dict):
        raise DeepSpeedConfigError([f"--deepspeed-config {path} must hold a JSON object, got {type(config).__name__}"])
    return config


def _zero_section(config: dict, args: argparse.Namespace, source: str, problems: list[str]) -> None:
    zero = config.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        problems.append(f"{source}: zero_optimization must be an object")
        return
    stage = zero.get("stage")
    if args.zero_stage is not None:
        if stage is not None and stage != args.zero_stage:
            problems.append(f"{source} sets zero_optimization.stage {stage} but --zero-stage is {args.zero_stage}; "
                            f"make them agree or drop one")
        zero["stage"] = stage = args.zero_stage
    if stage is None:
        problems.append(f"{source} sets no zero_optimization.stage; add it or pass --zero-stage 1|2|3")
    elif stage not in ZERO_STAGES:
        problems.append(f"{source}: zero_optimization.stage {stage!r} is not supported: use 1, 2 or 3 "
                        f"(stage 0 is plain data parallelism: the megatron engine, without --deepspeed)")
    if stage == 3 and getattr(args, "check_weight_hash_across_dp_replicas_interval", None):
        problems.append(f"{source}: ZeRO-3 partitions every parameter, so there are no replicas for "
                        f"--check-weight-hash-across-dp-replicas-interval to compare; drop it or use stage 1 or 2")
    if zero.get("compute_grad_norm") is False and args.check_for_nan_in_loss_and_grad:
        problems.append(f"{source}: zero_optimization.compute_grad_norm false leaves no gradient norm for "
                        f"--check-for-nan-in-loss-and-grad to test; remove it or pass "
                        f"--no-check-for-nan-in-loss-and-grad")
    for offload in ("offload_optimizer", "offload_param"):
        device = (zero.get(offload) or {}).get("device", "none")
        if device not in (None, "none"):
            problems.append(f"{source}: zero_optimization.{offload} ({device}) is not supported with POET: the "
                            f"merge resets optimizer state in memory; remove it")


def _agree(config: dict, key: str, value, flag: str, source: str, problems: list[str]) -> None:
    """Fill ``config[key]`` with ``value`` unless the config has its own, which must equal it."""
    given = config.get(key, "auto")
    if given != "auto" and given != value:
        problems.append(f"{source} sets {key} {given!r} but the flags say {value!r} ({flag}); make them agree "
                        f"or leave {key} out of the config")
    config[key] = value


def deepspeed_config(args: argparse.Namespace) -> dict:
    """The DeepSpeed config of the run (a new dict; see the module docstring).

    Raises :class:`DeepSpeedConfigError` listing every problem of the file and the flags.
    """
    source = f"--deepspeed-config {args.deepspeed_config}" if args.deepspeed_config else "--zero-stage"
    config = copy.deepcopy(_read_file(args.deepspeed_config)) if args.deepspeed_config else {}
    problems: list[str] = []
    _zero_section(config, args, source, problems)
    dp = max(args.data_parallel_size, 1)
    _agree(config, "train_micro_batch_size_per_gpu", args.micro_batch_size, "--micro-batch-size", source, problems)
    _agree(config, "gradient_accumulation_steps", args.global_batch_size // (args.micro_batch_size * dp),
           "--global-batch-size / (--micro-batch-size x data-parallel size)", source, problems)
    _agree(config, "train_batch_size", args.global_batch_size, "--global-batch-size", source, problems)
    _agree(config, "gradient_clipping", args.clip_grad, "--clip-grad", source, problems)
    if (config.get("fp16") or {}).get("enabled") in (True, "auto"):
        problems.append(f"{source}: fp16 (loss scaling) is not supported; use --bf16 or fp32")
    config.setdefault("bf16", {})
    _agree(config["bf16"], "enabled", args.bf16, "--bf16", f"{source} (bf16 section)", problems)
    for section, why in (("optimizer", "AdamW with POET groups from --lr/--poet-lr/--weight-decay/--adam-*"),
                         ("scheduler", "megatron's schedule from --lr-warmup-iters/--lr-decay-*")):
        if section in config:
            problems.append(f"{source} has a '{section}' section; remove it: the program builds the {section} "
                            f"itself ({why})")
    if problems:
        raise DeepSpeedConfigError(problems)
    return config


def deepspeed_arg_errors(args: argparse.Namespace) -> list[str]:
    """Every problem of the DeepSpeed flags and config (``[]`` when fine or without ``--deepspeed``)."""
    if not args.deepspeed:
        if args.deepspeed_config:
            return ["--deepspeed-config needs --deepspeed (or --zero-stage)"]
        return []
    problems = _flag_conflicts(args)
    if not args.deepspeed_config and args.zero_stage is None:
        return problems + ["--deepspeed needs --deepspeed-config FILE or --zero-stage 1|2|3"]
    try:
        deepspeed_config(args)
    except DeepSpeedConfigError as err:
        problems += err.problems
    return problems
