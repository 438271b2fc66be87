"""torch.compile: a POET transformer layer (fast and mem, block- and fully-stochastic, with the step's
shared blocks) compiles into one graph, and ``--compile`` trains what the eager program trains
(losses within 1e-5 relative: Inductor may reorder fp32 sums)."""
import pytest
import torch

from test_training import TINY, losses, run


@pytest.fixture(scope="module")
def process_group():
    from megatron_poet.megatron.cpu_backend import single_process

    with single_process(seed=5):
        yield


@pytest.mark.parametrize("mode", ["fast", "mem"])
@pytest.mark.parametrize("variant", ["bs", "fs"])
def test_a_poet_transformer_layer_compiles_without_graph_breaks(process_group, mode, variant):
    import torch._dynamo

    from megatron_poet.poet.side import begin_step
    from megatron_poet.training.arguments import parse_args
    from megatron_poet.training.model_provider import build_model

    args = parse_args(["--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups",
                       "2", "--poet-block-size", "16", "--poet-mode", mode, "--poet-variant", variant,
                       "--seq-length", "32"])
    args.vocab_size_unpadded = 100
    layer = build_model(args, 128).decoder.layers[0]
    begin_step(layer, 1)
    x = torch.randn(32, 2, 64, requires_grad=True)
    explained = torch._dynamo.explain(lambda x: layer(x, attention_mask=None)[0])(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_training_equals_eager(data):
    argv = data + TINY + ["--train-iters", "3", "--poet-merge-interval", "2", "--global-batch-size", "8"]
    eager, compiled = losses(run(argv)), losses(run(argv + ["--compile"]))
    assert sorted(eager) == sorted(compiled) == [1, 2, 3]
    assert all(abs(float(compiled[i]) / float(eager[i]) - 1) <= 1e-5 for i in eager), (eager, compiled)
