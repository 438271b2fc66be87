"""Mixture-of-experts layers whose experts are POET layers, in megatron-core's ``MoELayer``.

megatron-core's MoE spec is kept (``TopKRouter``, its token dispatchers, ``SequentialMLP``); only
each expert's ``linear_fc1``/``linear_fc2`` become POET layers. The router stays a dense
Megatron parameter trained by AdamW. Expert linears communicate nothing themselves (the
dispatcher moves tokens and their gradients between expert-parallel ranks), so a POET expert is
a single-device POET layer whose parameters megatron's DDP reduces over the expert
data-parallel group (:func:`mark_expert_parameters`).

Identity: an expert is named by its *global* index (``mlp.experts.<e>``), never its index
among a rank's local experts, so ``A0``, permutations and merge seeds are the same at every
expert-parallel size (:func:`global_expert_paths`).
"""
from __future__ import annotations

import dataclasses
import re

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import nn

from . import compat

if not hasattr(moe_utils, "te_general_gemm"):
    # megatron-core 0.16.1 without Transformer Engine leaves the name undefined, and its router
    # gating reads it (``if te_general_gemm is not None``): None selects its torch path.
    moe_utils.te_general_gemm = None

_LOCAL_EXPERT = re.compile(r"^(?P<experts>.*\.experts)\.local_experts\.(?P<index>\d+)(?P<rest>(\..*)?)$")


def moe_mlp_spec(num_experts: int, column: type | None, row: type | None, batched: bool = False) -> ModuleSpec:
    """megatron-core's MoE spec (router, sequential experts) with the experts' fc1/fc2 replaced.

    Args:
        num_experts: experts per MoE layer.
        column, row: the experts' ``linear_fc1`` / ``linear_fc2`` classes (POET layers bound to their
            config); ``None`` keeps Megatron's (the AdamW baseline).
        batched: POET experts computed all at once (:class:`.moe_batched.POETBatchedExperts`).
    """
    spec = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=num_experts, moe_grouped_gemm=False)
    if column is None:
        return spec
    experts = compat.replace_mlp_linears(spec.submodules.experts, linear_fc1=column, linear_fc2=row)
    if batched:
        from .moe_batched import POETBatchedExperts

        experts = dataclasses.replace(experts, module=POETBatchedExperts)
    return compat.replace_submodules(spec, experts=experts)


def global_expert_paths(model: nn.Module):
    """``fn(path) -> path`` replacing ``<...>.experts.local_experts.<i>`` by ``<...>.experts.<global i>``.

    Global index: ``EP rank x local experts + i`` (megatron's ``SequentialMLP`` assignment, the
    same its checkpoints use). Other paths are unchanged.
    """
    from megatron.core.transformer.moe.experts import SequentialMLP

    first_expert = {name: m.ep_group.rank() * m.num_local_experts for name, m in model.named_modules()
                    if isinstance(m, SequentialMLP)}

    def rename(path: str) -> str:
        match = _LOCAL_EXPERT.match(path)
        if match is None:
            return path
        owner = match["experts"]
        index = first_expert[owner] + int(match["index"])
        return f"{owner}.{index}{match['rest']}"

    return rename


def mark_expert_parameters(model: nn.Module) -> None:
    """Tag every parameter of every MoE expert (POET's or Megatron's) as megatron tags expert-parallel ones:

    - ``allreduce = False``: megatron's DDP reduces its gradient over the expert data-parallel group and
      its optimizer builder puts it in the expert optimizer — at every EP size (megatron does so only
      with EP > 1; at EP = 1 with tensor parallelism the TP ranks, which route different tokens to the
      same experts, would then not sum their gradients), so the optimizer's structure is the same at
      any EP size;
    - ``tensor_model_parallel``: not a copy of another TP rank's tensor (with expert TP size 1 each TP rank
      is its own expert data-parallel rank), so the gradient norm counts it on every TP rank and the replica
      check does not compare it across TP ranks. With expert TP = TP, a POET expert's replicated factor is a
      copy on each expert-TP rank (its gradient summed over them like a sequence-parallel norm's): untagged.
    """
    from megatron.core.transformer.moe.experts import SequentialMLP

    for module in model.modules():
        if isinstance(module, SequentialMLP):
            for param in module.parameters():
                param.allreduce = False
                # (an expert-TP-replicated factor, summed over expert-TP ranks, stays a TP copy: counted once)
                if not getattr(param, "tensor_model_parallel", False) and not getattr(param, "sequence_parallel", False):
                    compat.mark_tensor_parallel(param, dim=0)


def is_expert_parameter(param: nn.Parameter) -> bool:
    """Whether megatron reduces ``param``'s gradient over the expert data-parallel group (EP > 1)."""
    return not getattr(param, "allreduce", True)


def moe_layout_errors(config, poet_experts: bool) -> list[str]:
    """Problems of ``config``'s MoE layout (empty without MoE); ``poet_experts``: the experts are POET layers."""
    experts = config.num_moe_experts
    if not experts:
        return []
    errors = []
    ep = config.expert_model_parallel_size
    if experts % ep:
        errors.append(f"expert_model_parallel_size={ep} does not divide num_moe_experts={experts}")
    if not 1 <= config.moe_router_topk <= experts:
        errors.append(f"moe_router_topk={config.moe_router_topk} must be between 1 and num_moe_experts={experts}")
    etp, tp = config.expert_tensor_parallel_size or 1, config.tensor_model_parallel_size
    if etp not in (1, tp):
        errors.append(f"expert_tensor_parallel_size={etp}: experts are whole (1) or split like the attention "
                      f"(tensor_model_parallel_size={tp})")
    if config.moe_grouped_gemm and not poet_experts:
        errors.append("moe_grouped_gemm: Megatron's grouped experts need Transformer Engine or the grouped_gemm "
                      "package (batched experts here are POET's)")
    if config.moe_shared_expert_intermediate_size:
        errors.append("moe_shared_expert_intermediate_size: shared experts are not supported with POET experts")
    return errors
