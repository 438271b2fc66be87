"""Single-process checks of the TP layout logic: permutation groups, canonical form, misconfiguration.

No process group is needed: ``ShardedDimension`` and ``validate_model_config``
are pure functions of the layout, and the misconfiguration errors must be
raised before any distributed work starts.
"""
import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_poet.megatron.model import llama_config, validate_model_config  # noqa: E402
from megatron_poet.megatron.sharding import ShardedDimension  # noqa: E402
from megatron_poet.poet.config import POETConfig  # noqa: E402

POET = POETConfig(block_size=8, permutation_groups=4)


def _global_perm(size, parts, tp, seed=11):
    """Concatenate every rank's permutation, mapped to global indices (the canonical form)."""
    dims = [ShardedDimension(size, parts, tp, r, 4, POET, "fc1", "output_size") for r in range(tp)]
    return torch.cat([d.to_canonical(d.draw_local_permutation(seed)) for d in dims]), dims


@pytest.mark.parametrize("parts", [1, 2])
def test_permutation_is_layout_independent(parts):
    size = 128 * parts
    reference, _ = _global_perm(size, parts, 1)
    assert sorted(reference.tolist()) == list(range(size))  # a permutation of the global dimension
    for tp in (2, 4):
        perm, dims = _global_perm(size, parts, tp)
        # Same global permutation; rank r's canonical entries come in Megatron's [gate_r; up_r] order,
        # so compare as maps position-of-global-index -> source index.
        assert torch.equal(torch.sort(perm).values, torch.sort(reference).values)
        positions = torch.cat([d.local_to_global for d in dims])
        remapped = torch.empty_like(perm)
        remapped[positions] = perm
        assert torch.equal(remapped, reference), tp


def test_gate_and_up_never_mix():
    d = ShardedDimension(256, 2, 2, 1, 4, POET, "fc1", "output_size")
    perm = d.draw_local_permutation(5)
    half = d.local_size // 2
    assert perm[:half].max() < half and perm[half:].min() >= half


def test_canonical_round_trip_and_crossing_error():
    d2 = [ShardedDimension(128, 1, 2, r, 2, POET, "qkv", "output_size") for r in range(2)]
    for d in d2:
        local = d.draw_local_permutation(3)
        assert torch.equal(d.from_canonical(d.to_canonical(local), "qkv"), local)
    # A TP=1 permutation with one group crosses the TP=2 shard boundary.
    d1 = ShardedDimension(128, 1, 1, 0, 1, POET, "qkv", "output_size")
    canonical = d1.to_canonical(d1.draw_local_permutation(3))
    with pytest.raises(ValueError, match="crosses the shard boundaries"):
        d2[0].from_canonical(canonical[:64], "qkv")


def test_block_size_not_dividing_shard_fails_clearly():
    config = llama_config(2, 64, 4, 2, 80, tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match=r"linear_fc1.*block_size=16 does not divide"):
        validate_model_config(config, POETConfig(block_size=16, permutation_groups=2), 128)


def test_permutation_groups_not_multiple_of_tp_fails_clearly():
    config = llama_config(2, 64, 4, 2, 128, tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="permutation_groups=3 must be a multiple of tensor_model_parallel_size=2"):
        validate_model_config(config, POETConfig(block_size=8, permutation_groups=3), 128)


def test_tp_not_dividing_query_groups_fails_clearly():
    config = llama_config(2, 64, 4, 1, 128, tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="does not divide num_query_groups=1"):
        validate_model_config(config, POETConfig(block_size=8), 128)


def test_tp_not_dividing_heads_fails_clearly():
    # megatron-core's TransformerConfig already rejects it, before any model is built.
    with pytest.raises(ValueError, match="num_attention_heads"):
        llama_config(2, 96, 3, 3, 128, tensor_model_parallel_size=2)


def test_valid_layout_passes():
    config = llama_config(2, 64, 4, 2, 128, tensor_model_parallel_size=2)
    validate_model_config(config, POETConfig(block_size=8, permutation_groups=2), 128)
