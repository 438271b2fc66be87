"""The sdpa core attention (PyTorch's fused attention, no S x S matrix) computes what megatron's local
DotProductAttention computes: the same model built with either, same seed, gives the same logits
and gradients (fp32; 1e-5 relative: the same function summed in another order), with multi-head and
grouped-query attention, POET and Megatron's linears."""
import pytest
import torch

from _export_utils import megatron_logits


@pytest.fixture(scope="module")
def process_group():
    from megatron_poet.megatron.cpu_backend import single_process

    with single_process(seed=3):
        yield


def _model(attention: str, groups: int, poet: bool):
    from megatron_poet.training.arguments import parse_args
    from megatron_poet.training.model_provider import build_model

    args = parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                       "--num-query-groups", str(groups), "--poet-block-size", "16", "--attention-backend", attention,
                       "--seq-length", "24", *([] if poet else ["--no-poet"])])
    args.vocab_size_unpadded = 96
    return build_model(args, 128)


@pytest.mark.parametrize("groups", [4, 2])
@pytest.mark.parametrize("poet", [True, False], ids=["poet", "no_poet"])
def test_sdpa_equals_the_local_attention(process_group, groups, poet):
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    results = {}
    for attention in ("local", "sdpa"):
        model = _model(attention, groups, poet)
        logits = megatron_logits(model, tokens, 96)
        positions = torch.arange(24).unsqueeze(0).expand_as(tokens)
        model(tokens, positions, None)[..., :96].float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[attention] = logits, grads
    (local, local_grads), (sdpa, sdpa_grads) = results["local"], results["sdpa"]
    assert float((sdpa - local).abs().max() / local.abs().max()) <= 1e-5
    assert local_grads.keys() == sdpa_grads.keys() and len(local_grads) > 0
    for name, grad in local_grads.items():
        assert float((sdpa_grads[name] - grad).abs().max()) <= 1e-5 * float(grad.abs().max()) + 1e-9, name


def test_sdpa_is_the_default_and_megatron_names_map(process_group):
    from megatron_poet.megatron.attention import SDPAttention
    from megatron_poet.training.arguments import parse_args

    assert parse_args([]).attention_backend == "sdpa"
    assert parse_args(["--attention-backend", "unfused"]).attention_backend == "local"
    model = _model("sdpa", 4, True)
    assert isinstance(model.decoder.layers[0].self_attention.core_attention, SDPAttention)
