"""Mixture-of-experts with POET experts (megatron-core's MoELayer, sequential experts).

1. In one process, float64: a POET MoE layer's output and gradients (input, router, every expert's
   skew parameters), its experts run sequentially or batched, both POET variants, 8-bit ``A0`` (against its
   dequantized values), against a dense reference built independently: each token through its top-k
   experts' ``P A0 R`` (factors from the skews by matrix powers, :func:`test_poet_linear.dense_side`),
   weighted by the softmax of its top-k router logits (megatron's default routing, whose softmax is
   float32 whatever the dtype: the reference's too). Both modes.
2. Through the launcher (gloo): expert-parallel size 1 (allgather dispatcher) and 2 (alltoall),
   TP=2 with sequence parallelism x EP=2 with the distributed optimizer (world 4), and PP=2 x EP=2
   (world 4) print the same losses over a run with two merges (to 1e-6 relative: only the order of fp32 sums differs); a checkpoint saved at EP=2
   resumes at EP=1 (experts batched) and at EP=2 with the same losses, and the EP=2 resume is bitwise the uninterrupted run;
   the distributed optimizer's fully reshardable state saved at TP=2 x EP=2 resumes at TP=1 x EP=1.
   That checkpoint (EP=2) converts to a Hugging Face ``MixtralForCausalLM`` directory.
3. Export: a trained-looking POET MoE model exported as ``MixtralForCausalLM`` gives the training
   model's logits (fp32, 1e-4: folding P A0 R once instead of rotating activations reorders fp32
   sums, ~1e-6 here) and ``transformers`` generates its greedy tokens.
4. Bad MoE flags: one message each, before any work.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _export_utils import assert_same_greedy, greedy_with_margins, megatron_logits
from test_poet_linear import dense_a0, dense_side

HIDDEN, EXPERTS, TOPK, FFN = 32, 4, 2, 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def megatron_process():
    from megatron_poet.megatron.cpu_backend import single_process

    with single_process():
        yield


def _moe_model(mode: str = "fast", layers: int = 1, dtype=torch.float64, scale: float = 0.2, batched: bool = False,
               variant: str = "bs", storage: str = "native"):
    """A Llama-style POET MoE model whose factors are away from the identity (skews of ``scale``), so they
    matter; ``batched``: its experts computed batched (``moe_grouped_gemm``); POET ``variant`` and ``A0``
    ``storage`` (8-bit: groups of 16)."""
    from megatron_poet.megatron.model import build_llama_model, llama_config
    from megatron_poet.poet.config import POETConfig

    config = llama_config(num_layers=layers, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=64, num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=FFN,
                          use_cpu_initialization=True, params_dtype=dtype, moe_grouped_gemm=batched)
    poet = POETConfig(block_size=8, mode=mode, permutation_groups=1, variant=variant, a0_storage=storage,
                      a0_group_size=16)
    model = build_llama_model(config, poet, 128, 16, seed=7, backend="local")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skew"):
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _moe_layer(mode: str, batched: bool = False, **poet):
    return _moe_model(mode, batched=batched, **poet).decoder.layers[0].mlp


def _dense_expert(expert, skews):
    """``y -> fc2(silu(gate) * up)`` with each linear's dense ``P A0 R`` built from ``skews`` (float64)."""
    weights = [dense_side(linear.output_side, skews[(name, "output_side")]) @ dense_a0(linear)
               @ dense_side(linear.input_side, skews[(name, "input_side")])
               for name, linear in (("fc1", expert.linear_fc1), ("fc2", expert.linear_fc2))]

    def forward(y):
        gate, up = F.linear(y, weights[0]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, weights[1])

    return forward


@pytest.mark.parametrize("mode,batched,variant,storage", [
    ("fast", False, "bs", "native"), ("mem", False, "bs", "native"), ("fast", True, "bs", "native"),
    ("mem", True, "bs", "native"), ("fast", False, "fs", "native"), ("mem", True, "fs", "native"),
    ("fast", False, "bs", "int8"), ("mem", False, "bs", "int8"),
])
def test_poet_moe_layer_matches_float64_dense_reference(megatron_process, mode, batched, variant, storage):
    layer = _moe_layer(mode, batched, variant=variant, storage=storage)
    assert type(layer.experts).__name__ == ("POETBatchedExperts" if batched else "SequentialMLP")
    experts = layer.experts.local_experts
    x = torch.randn(8, 2, HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grad_out = torch.randn_like(x)

    xi = x.clone().requires_grad_()
    out, _ = layer(xi)
    out.backward(grad_out)

    skews = [{(name, side): getattr(getattr(e, f"linear_{name}"), side).skew.detach().clone().requires_grad_()
              for name in ("fc1", "fc2") for side in ("input_side", "output_side")} for e in experts]
    router = layer.router.weight.detach().clone().requires_grad_()
    xr = x.clone().requires_grad_()
    tokens = xr.reshape(-1, HIDDEN)
    top, chosen = torch.topk(F.linear(tokens, router), TOPK, dim=-1)
    probs = torch.softmax(top, dim=-1, dtype=torch.float32).to(x.dtype)  # megatron's routing: fp32 softmax
    dense = [_dense_expert(e, s) for e, s in zip(experts, skews)]
    reference = torch.stack([sum(probs[t, j] * dense[int(chosen[t, j])](tokens[t]) for j in range(TOPK))
                             for t in range(tokens.shape[0])]).reshape(x.shape)
    reference.backward(grad_out)

    # float64 throughout: differences are rounding (~1e-15 relative); 1e-10 leaves room for the
    # Neumann series and the block rotations summing in another order.
    assert torch.allclose(out, reference, atol=1e-10, rtol=0)
    assert torch.allclose(xi.grad, xr.grad, atol=1e-10, rtol=0)
    assert torch.allclose(layer.router.weight.grad, router.grad, atol=1e-10, rtol=0)
    for expert, reference_skews in zip(experts, skews):
        for (name, side), ref in reference_skews.items():
            got = getattr(getattr(expert, f"linear_{name}"), side).skew.grad
            assert torch.allclose(got, ref.grad, atol=1e-10, rtol=0), (name, side)


@pytest.mark.parametrize("mode", ["fast", "mem"])
def test_batched_experts_equal_sequential_ones_even_without_tokens(megatron_process, mode):
    """An expert that gets no token still takes part (its factors get a zero gradient, so a step's block
    gradients are complete), and the batched experts give the sequential ones' outputs and gradients, over a
    step of two passes (the sequential fc1s hand their output side dL/dG G^T, solved once at the step's end;
    the batched ones autograd's dL/dG)."""
    from megatron_poet.poet.side import begin_step

    counts = torch.tensor([3, 0, 4, 1])
    x = torch.randn(int(counts.sum()), HIDDEN, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    probs = torch.rand(x.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    results = []
    for batched in (False, True):
        experts = _moe_layer(mode, batched).experts
        storages = {e.linear_fc1.frozen_weight.untyped_storage().data_ptr() for e in experts.local_experts}
        assert len(storages) == (1 if batched else len(experts.local_experts))  # batched: views of one A0, no copy
        xi = x.clone().requires_grad_()
        begin_step(experts, 2)
        for _ in range(2):
            out, _ = experts(xi, counts, probs)
            out.sum().backward()
        grads = {name: p.grad for name, p in experts.named_parameters() if p.requires_grad}
        assert all(g is not None for g in grads.values())
        results.append((out, xi.grad, grads))
    (out_s, gx_s, g_s), (out_b, gx_b, g_b) = results
    assert torch.allclose(out_s, out_b, atol=1e-12, rtol=0) and torch.allclose(gx_s, gx_b, atol=1e-12, rtol=0)
    assert g_s.keys() == g_b.keys()
    for name in g_s:
        assert torch.allclose(g_s[name], g_b[name], atol=1e-12, rtol=0), name
    assert all(float(g_b[n].abs().max()) == 0 for n in g_b if ".local_experts.1." in n)  # the idle expert


def test_experts_are_named_by_global_index(megatron_process):
    layer = _moe_layer("fast")
    names = sorted({m.identity.rsplit(".", 1)[0] for m in layer.modules() if hasattr(m, "identity")})
    assert names == [f"layer1.mlp.experts.{e}" for e in range(EXPERTS)]
    assert all(getattr(p, "allreduce", True) is False for p in layer.experts.parameters())
    assert getattr(layer.router.weight, "allreduce", True)


def test_exported_mixtral_gives_the_training_models_logits_and_generates(megatron_process, tmp_path):
    from transformers import MixtralForCausalLM

    from megatron_poet.export.hf_export import export_gpt_model

    model = _moe_model(layers=2, dtype=torch.float32, scale=0.03).eval()  # as trained factors: near-orthogonal
    spec = export_gpt_model(model, str(tmp_path / "hf"))
    assert (spec.architecture, spec.num_experts, spec.experts_per_token) == ("mixtral", EXPERTS, TOPK)
    hf = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompts = torch.randint(0, 128, (6, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = hf(prompts).logits
    want = megatron_logits(model, prompts, 128)
    assert (got - want).abs().max() <= 1e-4
    expected, margins = greedy_with_margins(lambda t: megatron_logits(model, t, 128), prompts, steps=4)
    assert_same_greedy(hf, prompts, expected, margins)


# --------------------------------------------------------------------------- the training program
MOE_RUN = ["--mock-data", "--vocab-size", "128", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads",
           "4", "--ffn-hidden-size", "128", "--num-experts", "4", "--moe-ffn-hidden-size", "64",
           "--moe-aux-loss-coeff", "0.01", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
           "--poet-block-size", "8", "--poet-merge-interval", "3", "--log-interval", "1", "--eval-iters", "0"]
LOSS = re.compile(r"iteration +(\d+)/ *\d+ \|.*?lm loss: ([0-9.E+-]+).*?load_balancing_loss: ([0-9.E+-]+)")


def _launch(tmp_path, name: str, *flags: str, processes: int = 2) -> dict[int, float]:
    """Run the training program in ``processes`` processes; ``{iteration: lm loss}``."""
    import os

    # (without the rendezvous variables of this process's own one-rank world, if a test set one up)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["GPUS_PER_NODE"] = str(processes)
    proc = subprocess.run([sys.executable, "-m", "megatron_poet.launch", *MOE_RUN, *flags], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    found = {int(i): float(loss) for i, loss, aux in LOSS.findall(proc.stdout)}
    assert found, proc.stdout[-2000:]
    return found


def test_expert_parallel_sizes_train_the_same_model_and_checkpoints_reshard(tmp_path):
    ep1 = _launch(tmp_path, "EP=1", "--train-iters", "8", "--expert-model-parallel-size", "1")
    ep2 = _launch(tmp_path, "EP=2", "--train-iters", "8", "--expert-model-parallel-size", "2", "--save", "ckpt",
                  "--moe-token-dispatcher-type", "alltoall",  # (EP=1: allgather, the default)
                  "--tensorboard-dir", "tb",
                  "--save-interval", "6", "--check-weight-hash-across-dp-replicas-interval", "3")
    # TP=2 (sequence parallel: each TP rank routes its own tokens) x EP=2, distributed optimizer, world 4
    tp2_ep2 = _launch(tmp_path, "TP=2 x EP=2", "--train-iters", "8", "--expert-model-parallel-size", "2",
                      "--tensor-model-parallel-size", "2", "--sequence-parallel", "--use-distributed-optimizer",
                      "--check-weight-hash-across-dp-replicas-interval", "3", "--dist-ckpt-optim-fully-reshardable",
                      "--save", "ckpt_fr", "--save-interval", "6", processes=4)
    # Experts split over the TP ranks (expert TP = TP = 2, sequence parallel); its checkpoint resumes at TP=1
    etp2 = _launch(tmp_path, "TP=2, expert TP=2", "--train-iters", "8", "--tensor-model-parallel-size", "2",
                   "--sequence-parallel", "--expert-tensor-parallel-size", "2", "--save", "ckpt_etp",
                   "--save-interval", "6", "--check-weight-hash-across-dp-replicas-interval", "3")
    resumed = _launch(tmp_path, "resume expert TP=2 -> 1", "--train-iters", "8", "--load", "ckpt_etp",
                      "--ckpt-step", "6")
    for it in ep1:
        assert ep1[it] == pytest.approx(etp2[it], rel=1e-6, abs=0), it
    for it in resumed:
        assert resumed[it] == pytest.approx(etp2[it], rel=1e-6, abs=0), it
    # TensorBoard: the aux loss, and each expert's share of its layer's routed tokens (summing to 1)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("load_balancing_loss")] == list(range(1, 9))
    for layer in (1, 2):
        shares = [events.Scalars(f"moe/layer{layer}/expert{e}-token-share")[-1].value for e in range(4)]
        assert sum(shares) == pytest.approx(1.0, abs=1e-6) and all(0 <= s <= 1 for s in shares), shares
    # PP=2 x EP=2 (experts spread over the data-parallel ranks of each stage), world 4
    pp2_ep2 = _launch(tmp_path, "PP=2 x EP=2", "--train-iters", "8", "--expert-model-parallel-size", "2",
                      "--pipeline-model-parallel-size", "2", processes=4)
    assert set(ep1) == set(ep2) == set(tp2_ep2) == set(pp2_ep2) == set(range(1, 9))
    for it in ep1:  # merges after iterations 3 and 6
        for other in (ep2, tp2_ep2, pp2_ep2):
            assert ep1[it] == pytest.approx(other[it], rel=1e-6, abs=0), it
    for ep in ("1", "2"):  # the checkpoint of iteration 6, resumed at either size
        batched = ["--moe-grouped-gemm"] if ep == "1" else []  # batched experts resume sequential ones' state
        resumed = _launch(tmp_path, f"resume EP=2 -> {ep}", "--train-iters", "8", "--expert-model-parallel-size", ep,
                          "--load", "ckpt", "--ckpt-step", "6", *batched)
        assert set(resumed) == {7, 8}
        for it in resumed:
            if ep == "2":
                assert resumed[it] == ep2[it], it  # bitwise: same layout, same sums
            else:
                assert resumed[it] == pytest.approx(ep2[it], rel=1e-6, abs=0), it
    # The distributed optimizer's fully reshardable state (saved at TP=2 x EP=2) resumes at TP=1 x EP=1.
    resumed = _launch(tmp_path, "resume TP=2 x EP=2 -> TP=1 x EP=1", "--train-iters", "8", "--load", "ckpt_fr",
                      "--ckpt-step", "6", "--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable")
    assert set(resumed) == {7, 8}
    for it in resumed:
        assert resumed[it] == pytest.approx(tp2_ep2[it], rel=1e-6, abs=0), it
    # Its default format keeps expert state in its EP layout's buckets: another EP size is refused.
    from megatron_poet.checkpoint import CheckpointError
    from megatron_poet.training.arguments import parse_args
    from megatron_poet.training.checkpointing import check_checkpoint_args

    args = parse_args([*MOE_RUN, "--load", str(tmp_path / "ckpt"), "--use-distributed-optimizer"], world_size=2)
    with pytest.raises(CheckpointError, match="saved at --expert-model-parallel-size 2, this run uses 1"):
        check_checkpoint_args(args)
    # The checkpoint exports (experts gathered from both EP ranks' shards) as a Mixtral that generates.
    proc = subprocess.run([sys.executable, "tools/convert_to_hf.py", "--load", str(tmp_path / "ckpt"), "--output",
                           str(tmp_path / "hf")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import MixtralForCausalLM

    hf = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert len(hf.model.layers) == 2 and hf.config.num_local_experts == 4
    assert hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_adamw_experts_with_tensor_parallelism_train_the_same_model(tmp_path):
    """Megatron's own experts (--no-poet) at TP=2 with sequence parallelism: each TP rank routes its own
    tokens to the same experts, whose gradients must be summed over the TP ranks (they are tagged as
    expert parameters at every EP size)."""
    flags = ["--no-poet", "--train-iters", "4"]
    tp1 = _launch(tmp_path, "AdamW TP=1", *flags, processes=1)
    tp2 = _launch(tmp_path, "AdamW TP=2", *flags, "--tensor-model-parallel-size", "2", "--sequence-parallel")
    for it in tp1:
        assert tp1[it] == pytest.approx(tp2[it], rel=1e-6, abs=0), it


@pytest.mark.parametrize("flags,message", [
    (["--num-experts", "3", "--expert-model-parallel-size", "2"], "--expert-model-parallel-size 2 does not divide"),
    (["--num-experts", "2", "--moe-router-topk", "3"], "--moe-router-topk 3 must be between 1 and --num-experts 2"),
    (["--num-experts", "2", "--moe-token-dispatcher-type", "flex"], "needs DeepEP"),
    (["--num-experts", "2", "--moe-grouped-gemm", "--no-poet"], "--moe-grouped-gemm with --no-poet"),
    (["--num-experts", "2", "--moe-grouped-gemm", "--poet-a0-storage", "int8"], "batched POET experts hold"),
    (["--num-experts", "2", "--zero-stage", "1"], "MoE runs on the megatron-core engine"),
    (["--num-experts", "2", "--expert-tensor-parallel-size", "2"], "--expert-tensor-parallel-size 2: experts are"),
    (["--expert-model-parallel-size", "2"], "--expert-model-parallel-size needs --num-experts"),
    (["--num-experts", "2", "--tensor-model-parallel-size", "2"], "needs --sequence-parallel"),
    (["--num-experts", "2", "--compile"], "--compile with --num-experts"),
    (["--num-experts", "2", "--moe-aux-loss-coeff", "0.1", "--moe-router-load-balancing-type", "none"],
     "has no effect"),
])
def test_bad_moe_flags_are_refused_before_any_work(flags, message):
    from megatron_poet.training.arguments import ArgumentError, parse_args

    with pytest.raises(ArgumentError, match=re.escape(message)):
        parse_args(["--mock-data", "--vocab-size", "64", *flags], world_size=2)
