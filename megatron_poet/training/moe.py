"""Mixture-of-experts flags, with Megatron-LM's names and megatron-core's semantics.

``--num-experts E`` replaces every transformer layer's MLP by megatron-core's ``MoELayer``: a
dense router (trained with AdamW) sends each token to its ``--moe-router-topk`` experts, each
expert an MLP of width ``--moe-ffn-hidden-size`` whose linears are POET layers (Megatron's with
``--no-poet``). ``--expert-model-parallel-size`` spreads the experts over ranks (each holds
``E / EP``); the expert data-parallel group is ``world / (EP x PP)``. The load-balancing aux loss
(``--moe-aux-loss-coeff``) trains the router; it and the tokens each expert received are logged.

Tensor parallelism needs ``--sequence-parallel`` (as in Megatron-LM): attention is split over TP
ranks and each routes its own tokens. Experts are whole on their rank (``--expert-tensor-parallel-size
1``, the default: TP ranks are expert data-parallel ranks) or split over the TP ranks like the attention
(``--expert-tensor-parallel-size`` = TP: the dispatcher gives each of them all its experts' tokens and
sums their partial outputs; a POET expert's replicated factor has its gradient summed over them).

``--moe-grouped-gemm`` computes a layer's POET experts batched (:mod:`megatron_poet.megatron.moe_batched`).

Not supported, refused before any work: ``--expert-tensor-parallel-size`` other than 1 or TP,
Megatron's grouped GEMM for ``--no-poet`` (it needs TE or the ``grouped_gemm`` package), MoE with
``--deepspeed``, and the ``flex`` dispatcher (DeepEP, GPUs only). The flags that define the model's
function (``--num-experts``, ``--moe-router-topk``, ``--moe-ffn-hidden-size``) are recorded in checkpoints
(``megatron_poet.checkpoint.record.SHAPE_ARGS``).
"""
from __future__ import annotations

import argparse

DISPATCHERS = ("allgather", "alltoall")
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, default=None, help="experts per MoE layer (every layer); default: dense")
    g.add_argument("--moe-router-topk", type=int, default=2, help="experts each token is sent to")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="each expert's MLP width; default: --ffn-hidden-size")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0, help="weight of the load-balancing loss")
    g.add_argument("--moe-router-load-balancing-type", choices=LOAD_BALANCING, default="aux_loss",
                   help="aux_loss: Switch Transformer's, over the micro-batch; seq_aux_loss: per sequence; "
                        "global_aux_loss: over the global batch; none")
    g.add_argument("--moe-token-dispatcher-type", choices=(*DISPATCHERS, "flex"), default="allgather",
                   help="how tokens reach experts on other expert-parallel ranks (flex: DeepEP, GPUs only)")
    g.add_argument("--expert-model-parallel-size", type=int, default=1, help="ranks the experts are spread over")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=1,
                   help="ranks each expert is split over: 1 (whole experts) or --tensor-model-parallel-size")
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="POET experts: all local experts computed batched (megatron_poet/megatron/moe_batched.py) "
                        "instead of one after the other; not with --no-poet (Megatron's needs TE/grouped_gemm)")


def fill_defaults(args: argparse.Namespace) -> None:
    if args.num_experts:
        if args.moe_ffn_hidden_size is None:
            args.moe_ffn_hidden_size = args.ffn_hidden_size
    else:
        args.moe_ffn_hidden_size = None


def argument_errors(args: argparse.Namespace) -> list[str]:
    """Bad MoE flags, one message each, before any work."""
    errors, experts = [], args.num_experts
    if experts is None:
        errors += [f"{flag} needs --num-experts" for flag, given in (
            ("--expert-model-parallel-size", args.expert_model_parallel_size != 1),
            ("--moe-grouped-gemm", args.moe_grouped_gemm)) if given]
        return errors
    ep, t, pp = args.expert_model_parallel_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if experts < 1:
        return [f"--num-experts must be >= 1, got {experts}"]
    if not 1 <= args.moe_router_topk <= experts:
        errors.append(f"--moe-router-topk {args.moe_router_topk} must be between 1 and --num-experts {experts}")
    if ep < 1 or experts % ep:
        errors.append(f"--expert-model-parallel-size {ep} does not divide --num-experts {experts}")
    elif args.world_size % (ep * pp):
        errors.append(f"--expert-model-parallel-size {ep} x --pipeline-model-parallel-size {pp} does not divide "
                      f"the world size {args.world_size}")
    if args.moe_ffn_hidden_size < 1:
        errors.append(f"--moe-ffn-hidden-size must be >= 1, got {args.moe_ffn_hidden_size}")
    etp = args.expert_tensor_parallel_size
    if etp not in (1, t):
        errors.append(f"--expert-tensor-parallel-size {etp}: experts are whole on their rank (1) or split like the "
                      f"attention (--tensor-model-parallel-size {t}); other sizes are not supported here")
    elif etp > 1:
        if args.moe_ffn_hidden_size % etp:
            errors.append(f"--expert-tensor-parallel-size {etp} does not divide --moe-ffn-hidden-size "
                          f"{args.moe_ffn_hidden_size}")
        if args.model_style == "gpt2" or args.moe_grouped_gemm:
            errors.append(f"--expert-tensor-parallel-size {etp} with --model-style gpt2 (expert biases) or "
                          "--moe-grouped-gemm is not supported; use 1")
    if t > 1 and not args.sequence_parallel:
        errors.append(f"--num-experts with --tensor-model-parallel-size {t} needs --sequence-parallel (as in "
                      "Megatron-LM: each tensor-parallel rank routes its own tokens)")
    if args.moe_grouped_gemm:
        if not args.poet:
            errors.append("--moe-grouped-gemm with --no-poet: Megatron's grouped experts need Transformer Engine or "
                          "the grouped_gemm package; drop the flag")
        if args.poet_a0_storage == "int8" or args.fp8_format or args.model_style == "gpt2":
            errors.append("--moe-grouped-gemm: batched POET experts hold bias-free, unquantized A0 (not with "
                          "--poet-a0-storage int8, --fp8-format or --model-style gpt2); drop the flag")
    if args.moe_token_dispatcher_type == "flex":
        errors.append("--moe-token-dispatcher-type flex needs DeepEP on GPUs; use allgather or alltoall")
    if args.deepspeed:
        errors.append("--num-experts with --deepspeed: MoE runs on the megatron-core engine (drop --deepspeed)")
    if args.moe_aux_loss_coeff < 0:
        errors.append(f"--moe-aux-loss-coeff must be >= 0, got {args.moe_aux_loss_coeff}")
    elif args.moe_aux_loss_coeff > 0 and args.moe_router_load_balancing_type == "none":
        errors.append("--moe-aux-loss-coeff has no effect with --moe-router-load-balancing-type none")
    if args.poet_fp32_master_a0 and args.use_distributed_optimizer:
        errors.append("--poet-fp32-master-a0 with --use-distributed-optimizer shards the fp32 master over data-parallel "
                      "ranks, which is not implemented for MoE experts; drop one of them")
    if args.compile:
        errors.append("--compile with --num-experts: the token dispatch depends on data (host synchronization, "
                      "token counts), not compiled here; drop --compile")
    return errors


def config_fields(args: argparse.Namespace) -> dict:
    """megatron-core ``TransformerConfig`` fields of the MoE flags (none without ``--num-experts``)."""
    if not args.num_experts:
        return {}
    return dict(
        num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size, moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size, moe_grouped_gemm=args.moe_grouped_gemm,
    )
