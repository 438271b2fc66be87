"""One model per seed, single process (fast): merge seeds, shards of redrawn tensors, permutation groups,
pipeline arguments. The multi-process checks are in tests/test_pipeline_parallel.py."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from megatron_poet import MergeScheduler, POETLinear


def _layers(n: int) -> list[POETLinear]:
    g = torch.Generator().manual_seed(0)
    layers = [POETLinear(16, 16, block_size=4, generator=g) for _ in range(n)]
    for i, layer in enumerate(layers, start=1):
        layer.identity = f"layer{i}.mlp"  # what the megatron builders set: the global layer name
    return layers


def _merge(layers: list[POETLinear], merges: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    scheduler = MergeScheduler(nn.ModuleList(layers), 1, reset_optimizer_state=lambda params: None, seed=5)
    for _ in range(merges):
        scheduler.step()
    return [(layer.input_side.perm.clone(), layer.output_side.perm.clone()) for layer in layers]


def test_merge_permutations_follow_the_global_layer_not_the_local_order():
    """Layers 3-4 on a second pipeline stage draw what they draw in the whole model, not what
    layers 1-2 (the same local positions on the first stage) draw."""
    layers = _layers(4)
    stage0, stage1 = copy.deepcopy(layers[:2]), copy.deepcopy(layers[2:])
    whole = _merge(layers)
    split = _merge(stage0) + _merge(stage1)
    for (a_in, a_out), (b_in, b_out) in zip(whole, split):
        assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out)
    assert not torch.equal(split[0][0], split[2][0])  # local position 0 of both stages: different layers


def test_merge_seed_without_identity_is_the_module_path():
    layers = _layers(2)
    for layer in layers:
        layer.identity = None
    renamed = copy.deepcopy(layers)
    first = _merge(layers)
    model = nn.ModuleDict({"1": renamed[1], "0": renamed[0]})  # same paths, another order
    scheduler = MergeScheduler(model, 1, reset_optimizer_state=lambda params: None, seed=5)
    scheduler.step()
    scheduler.step()
    assert torch.equal(model["0"].input_side.perm, first[0][0]) and torch.equal(model["1"].input_side.perm, first[1][0])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dim", [0, 1])
def test_redrawn_shard_is_megatrons_shard_of_the_full_tensor(dim, stride):
    """:func:`_shard` keeps the slice megatron's own CPU initialization keeps (its reference
    implementation ``_initialize_affine_weight_cpu``), SwiGLU's stride 2 included."""
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    from megatron_poet.megatron.layout_free_init import _shard

    full = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))
    tp = 2
    for rank in range(tp):
        shape = list(full.shape)
        shape[dim] //= tp
        param = nn.Parameter(torch.empty(shape))
        _initialize_affine_weight_cpu(param, 8, 12, shape[dim], dim, lambda t: t.copy_(full), stride=stride,
                                      rank=rank, world_size=tp)
        assert torch.equal(_shard(full, param, tp, rank), param.data)


def test_default_permutation_groups_depend_on_the_model_not_the_layout():
    from megatron_poet.megatron.sharding import layout_free_permutation_groups
    from megatron_poet.poet.config import POETConfig
    from megatron_poet.training.arguments import parse_args, poet_config

    tiny = ["--hidden-size", "64", "--num-attention-heads", "4", "--poet-block-size", "16"]
    groups = {tp: poet_config(parse_args(tiny + ["--tensor-model-parallel-size", str(tp)], world_size=tp))
              .permutation_groups for tp in (1, 2)}
    assert groups == {1: 2, 2: 2}  # 64 / 2 = 32 = two blocks of 16 per group
    assert poet_config(parse_args(tiny + ["--poet-permutation-groups", "1"])).permutation_groups == 1
    # Llama-8B shapes (qkv 6144, proj 4096, fc1 2 x 14336, fc2 14336), block 256: 8 groups, TP 1-8 alike.
    llama8b = [(6144, 1), (4096, 1), (2 * 14336, 2), (14336, 1)]
    assert layout_free_permutation_groups(llama8b, POETConfig(256), tp_size=1) == 8
    # Paper's 60M (hidden 512, block 256): two groups would hold one block each -> one group.
    assert layout_free_permutation_groups([(1536, 1), (512, 1), (2 * 1280, 2), (1280, 1)], POETConfig(256), 1) == 1
    assert layout_free_permutation_groups(llama8b, POETConfig(256), tp_size=16) == 16  # TP > 8: the layers' default


@pytest.mark.parametrize("argv, world, message", [
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     "--num-layers-per-virtual-pipeline-stage 3 does not divide the 2 layers of each pipeline stage"),
    (["--num-layers", "4", "--num-layers-per-virtual-pipeline-stage", "1"], 1,
     "needs --pipeline-model-parallel-size > 1"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--micro-batch-size", "4", "--global-batch-size", "12"], 2, "has 3 per global batch"),
    (["--num-layers", "5", "--pipeline-model-parallel-size", "2"], 2,
     "--num-layers 5 is not divisible by --pipeline-model-parallel-size 2"),
])
def test_bad_pipeline_layouts_fail_before_work(argv, world, message):
    from megatron_poet.training.arguments import ArgumentError, parse_args

    with pytest.raises(ArgumentError, match=re.escape(message)):
        parse_args(argv, world_size=world)


def test_virtual_stages_per_rank():
    from megatron_poet.training.arguments import parse_args

    args = parse_args(["--num-layers", "8", "--pipeline-model-parallel-size", "2",
                       "--num-layers-per-virtual-pipeline-stage", "2", "--global-batch-size", "16"], world_size=2)
    assert args.virtual_pipeline_model_parallel_size == 2
    args = parse_args(["--num-layers", "8", "--pipeline-model-parallel-size", "2",
                       "--num-layers-per-virtual-pipeline-stage", "4"], world_size=2)
    assert args.virtual_pipeline_model_parallel_size is None  # one chunk per rank: the plain schedule
