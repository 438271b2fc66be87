"""Worker of ``test_fp8_training.py::test_fp8_tensor_parallel_layers_match_tp1`` (torchrun, 2 CPU ranks).

A SwiGLU column-parallel (128 -> 2 x 256) and a row-parallel (256 -> 128) POET layer, built at TP=2
(both ranks) and at TP=1 (each rank alone, in a single-rank group) from the same seeds, float32
activations, FP8 hybrid in each recipe. Writes ``result.json`` (rank 0) with, per recipe:

- ``max_rel``: the largest relative difference between the TP=2 and TP=1 layers over the outputs,
  the input gradients and the replicated factors' gradients (float32 sums in another order);
- ``fp8_effect``: the smallest relative difference between the TP=2 layers' outputs with and without
  FP8 (FP8 ran: its error is percents);
- ``groups``: which operands' scales each layer all-reduces over the TP group;
- ``fp8_in_state``: whether anything FP8 reached ``sharded_state_dict``;
and ``amax``: per granularity, whether a rank's shard quantized with the TP group equals the slice of
the whole tensor quantized alone (``with_group``), and whether it does without the group (``without_group``,
a negative control: one shard is 2^-20 of the other, so its own scale would keep values the global
scale flushes to zero).
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

TOKENS, HIDDEN, FFN = 64, 128, 256


def build(tp_group, recipe: str):
    from megatron_poet.megatron.layers import POETColumnParallelLinear, POETRowParallelLinear
    from megatron_poet.megatron.model import llama_config
    from megatron_poet.poet.config import POETConfig
    from megatron_poet.poet.fp8 import FP8Config, enable_fp8

    tp = tp_group.size()
    config = llama_config(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=4,
                          ffn_hidden_size=FFN, tensor_model_parallel_size=tp, use_cpu_initialization=True,
                          params_dtype=torch.float32)
    poet = POETConfig(block_size=32, permutation_groups=2)  # the same global layer at TP=1 and TP=2
    col = POETColumnParallelLinear(HIDDEN, 2 * FFN, config=config, poet=poet, bias=False, stride=2, tp_group=tp_group)
    row = POETRowParallelLinear(FFN, HIDDEN, config=config, poet=poet, bias=False, tp_group=tp_group)
    g = torch.Generator().manual_seed(3)
    for seed, layer, replicated in ((11, col, "input_side"), (12, row, "output_side")):
        layer.initialize(seed)
        with torch.no_grad():  # the replicated factor has the same shape in both layouts
            side = getattr(layer, replicated)
            side.skew.copy_(torch.randn(side.skew.shape, generator=g) * 0.05)
    model = torch.nn.ModuleDict({"col": col, "row": row})
    enable_fp8(model, FP8Config("hybrid", recipe, "emulation" if recipe == "blockwise" else "auto"))
    return model


def run(model, x, dy_col, x_row, dy_row):
    """Global (gathered) ``[y_col, dx_col, dskew_R(col), y_row, dx_row, dskew_P(row)]``."""
    col, row = model["col"], model["row"]
    out = []
    idx = col.sharded.local_to_global
    x = x.clone().requires_grad_()
    y, _ = col(x)
    y.backward(dy_col[:, idx])
    out += [_gather_global(y.detach(), col), x.grad, col.input_side.skew.grad]
    idx = row.sharded.local_to_global
    x_local = x_row[:, idx].clone().requires_grad_()
    y, _ = row(x_local)
    y.backward(dy_row)
    out += [y.detach(), _gather_global(x_local.grad, row), row.output_side.skew.grad]
    return out


def _gather_global(local: torch.Tensor, layer) -> torch.Tensor:
    """The full ``(tokens, features)`` tensor in global feature order from every rank's local columns."""
    group = layer.tp_group
    pieces = [torch.empty_like(local) for _ in range(group.size())]
    dist.all_gather(pieces, local.contiguous(), group=group)
    indices = [torch.empty_like(layer.sharded.local_to_global) for _ in range(group.size())]
    dist.all_gather(indices, layer.sharded.local_to_global, group=group)
    out = torch.empty(local.shape[0], local.shape[1] * group.size())
    out[:, torch.cat(indices)] = torch.cat(pieces, dim=1)
    return out


def amax_reduction(tp2) -> dict:
    from megatron_poet.poet.fp8.quantize import FORWARD_DTYPE, dequantize, quantize

    g = torch.Generator().manual_seed(5)
    whole = torch.randn(TOKENS, FFN, generator=g)
    whole[:, FFN // 2:] *= 2.0 ** -20
    rank = dist.get_rank()
    part = whole[:, rank * FFN // 2:(rank + 1) * FFN // 2]
    result = {}
    for granularity in ("tensor", "row"):
        want = dequantize(quantize(whole, FORWARD_DTYPE, granularity))[:, rank * FFN // 2:(rank + 1) * FFN // 2]
        with_group = torch.equal(dequantize(quantize(part, FORWARD_DTYPE, granularity, tp2)), want)
        without = torch.equal(dequantize(quantize(part, FORWARD_DTYPE, granularity)), want)
        flags = torch.tensor([float(with_group), float(without)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        result[granularity] = {"with_group": bool(flags[0]), "without_group": bool(flags[1])}
    return result


def main(out_path: str) -> None:
    from megatron_poet.megatron.cpu_backend import destroy_distributed, initialize_distributed

    initialize_distributed(1, 1, seed=1)
    tp2 = dist.new_group([0, 1])
    alone = [dist.new_group([r]) for r in range(2)][dist.get_rank()]
    g = torch.Generator().manual_seed(7)
    data = [torch.randn(TOKENS, HIDDEN, generator=g), torch.randn(TOKENS, 2 * FFN, generator=g),
            torch.randn(TOKENS, FFN, generator=g), torch.randn(TOKENS, HIDDEN, generator=g)]
    results = {"amax": amax_reduction(tp2)}
    for recipe in ("tensorwise", "rowwise", "blockwise"):
        tp2_model, tp1_model = build(tp2, recipe), build(alone, recipe)
        got, want = run(tp2_model, *data), run(tp1_model, *data)
        max_rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(got, want))
        state = {**tp2_model["col"].sharded_state_dict("col."), **tp2_model["row"].sharded_state_dict("row.")}
        fp8_in_state = any("fp8" in key or getattr(getattr(v, "data", None), "dtype", None)
                           in (torch.float8_e4m3fn, torch.float8_e5m2) for key, v in state.items())
        groups = {name: sorted(k for k, v in layer.fp8.amax_groups().items() if v is tp2)
                  for name, layer in tp2_model.items()}
        for layer in tp2_model.values():
            layer.fp8 = None
        plain = run(tp2_model, *data)
        fp8_effect = min(((got[i] - plain[i]).norm() / plain[i].norm()).item() for i in (0, 3))
        results[recipe] = {"max_rel": max_rel, "fp8_effect": fp8_effect, "groups": groups,
                           "fp8_in_state": fp8_in_state}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1])
