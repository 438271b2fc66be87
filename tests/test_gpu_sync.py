"""No host synchronization in POET's training hot path (GPU only: ``torch.cuda.set_sync_debug_mode``).

A training step of POET layers — the step's blocks built once, every micro-batch's forward and
backward, the Cayley–Neumann series differentiated once in the last backward pass — runs under
``set_sync_debug_mode("error")``, which raises at any operation that waits for the GPU (``.item()``,
``torch.linalg.solve``'s error check, a boolean mask, ...). A first step outside it warms up the
Triton kernels' autotuning, which synchronizes by design.
"""
import pytest
import torch

from megatron_poet import POETLinear
from megatron_poet.poet.side import begin_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: host synchronizations are detected by "
                                       "torch.cuda.set_sync_debug_mode, which only CUDA has")


@pytest.mark.parametrize("mode", ["fast", "mem"])
@pytest.mark.parametrize("variant", ["bs", "fs"])
def test_a_poet_training_step_never_waits_for_the_gpu(mode, variant):
    g = torch.Generator().manual_seed(0)
    layer = POETLinear(512, 1024, bias=True, block_size=64, mode=mode, variant=variant, dtype=torch.bfloat16,
                       generator=g).cuda()
    with torch.no_grad():
        for p in layer.poet_parameters():
            p.normal_(0, 0.01)
    xs = [torch.randn(4, 128, 512, device="cuda", dtype=torch.bfloat16) for _ in range(3)]

    def step():
        begin_step(layer, len(xs))
        for x in xs:
            layer(x).float().square().mean().backward()

    step()  # warm-up: kernel autotuning synchronizes
    layer.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.poet_parameters())
