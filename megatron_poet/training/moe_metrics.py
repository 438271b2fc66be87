"""What a mixture-of-experts run logs: the routers' load-balancing loss and the tokens each expert got.

- The aux losses come from megatron-core's own tracker (its routers record
  ``load_balancing_loss`` and the like per layer and micro-batch); they are reduced as
  Megatron-LM reduces them (summed over pipeline stages, averaged over data-parallel ranks) and
  printed under the same names, averaged over MoE layers and the micro-batches since the last line.
- Tokens per expert: each router's routing map, counted during training forwards, summed over
  data-parallel, pipeline and tensor-parallel ranks (with sequence parallelism each routes its own
  tokens; full recomputation counts each token twice, which leaves the shares as they are). The log line shows the busiest expert's load relative to
  the mean (1.00 = perfectly balanced); TensorBoard gets each expert's share of its layer's
  routed tokens (``moe/layer<L>/expert<E>-token-share``).

Both are reduced only at log iterations (one collective each over every rank).
"""
from __future__ import annotations

import argparse

import torch


class MoEMetrics:
    """Collects the metrics above over the model chunks of this rank (:meth:`for_run`)."""

    def __init__(self, args: argparse.Namespace, chunks: list[torch.nn.Module]):
        from megatron.core.transformer.moe.router import TopKRouter

        self.num_layers, self.num_experts = args.num_layers, args.num_experts
        self.micro_batches_per_iteration = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
        device = next(chunks[0].parameters()).device
        self.tokens = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64, device=device)
        self.iterations = 0  # since the last reduce
        self._hooks = [m.register_forward_hook(self._count) for chunk in chunks for m in chunk.modules()
                       if isinstance(m, TopKRouter)]

    @classmethod
    def for_run(cls, args: argparse.Namespace, chunks: list[torch.nn.Module]) -> MoEMetrics | None:
        """The run's collector, ``None`` for a dense model."""
        return cls(args, chunks) if args.num_experts else None

    def _count(self, router, inputs, output) -> None:
        if router.training:
            _, routing_map = output
            self.tokens[router.layer_number - 1] += routing_map.sum(dim=0).to(self.tokens)

    def iteration_done(self) -> None:
        self.iterations += 1

    def reduce(self) -> dict[str, float]:
        """Collective over all ranks: ``{name: value}`` since the last call, then reset.

        Names: megatron's aux-loss names (e.g. ``load_balancing_loss``), ``expert load max/mean``
        and ``moe/layer<L>/expert<E>-token-share``.
        """
        from megatron.core import parallel_state
        from megatron.core.transformer.moe import moe_utils

        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        names = sorted(tracker)
        moe_utils.reduce_aux_losses_tracker_across_ranks(names)
        per = max(self.iterations * self.micro_batches_per_iteration, 1) * self.num_layers
        values = {name: float(tracker[name]["values"].sum()) / per for name in names}
        moe_utils.clear_aux_losses_tracker()
        for group in (parallel_state.get_data_parallel_group(), parallel_state.get_pipeline_model_parallel_group(),
                      parallel_state.get_tensor_model_parallel_group()):  # (sequence parallel: own tokens per TP rank)
            torch.distributed.all_reduce(self.tokens, group=group)
        routed = self.tokens.sum(dim=1, keepdim=True)
        share = torch.where(routed > 0, self.tokens / routed.clamp(min=1), torch.zeros_like(self.tokens))
        values["expert load max/mean"] = float(share.max() * self.num_experts)
        values.update({f"moe/layer{layer + 1}/expert{expert}-token-share": float(share[layer, expert])
                       for layer in range(self.num_layers) for expert in range(self.num_experts)})
        self.tokens.zero_()
        self.iterations = 0
        return values

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
