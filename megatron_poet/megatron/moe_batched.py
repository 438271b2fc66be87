"""All local POET experts in one batched computation (``--moe-grouped-gemm`` with POET experts).

megatron-core's ``SequentialMLP`` runs its local experts one after the other: per expert two
rotations, a GEMM and two more rotations per linear. :class:`POETBatchedExperts` keeps the same
experts (same modules, parameters, names, checkpoints, merges and export as the sequential
experts) but runs each of fc1 and fc2 for all local experts at once: the tokens of each expert
are padded to the busiest expert's count, ``(E, T, d)``; the input rotation of every expert is one
gather and one batched block product; the frozen GEMM one ``torch.bmm`` over ``A0`` held
stacked ``(E, d_out, d_in)`` (each expert's ``frozen_weight`` is a view into it, so nothing is
copied); the output rotation another batched block product. With ``--poet-mode mem`` the two
linears recompute in backward (``torch.utils.checkpoint``), keeping only their inputs.

The math is the layers' own (``P A0' R`` with ``A0'`` stored pre-permuted, see
:mod:`megatron_poet.poet.rotation`): ``z = BD(G_R) (Pi_in x)``, ``h = A0' z``,
``y = Pi_out^T BD(G_P) h``; the blocks come from each side's ``forward_blocks`` (built once per
optimizer step with several micro-batches), autograd does the rest. Padding costs
``E x max count - tokens`` rows of work; the sequential experts have none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP
from torch.utils.checkpoint import checkpoint

LINEARS = ("linear_fc1", "linear_fc2")


def _rotate(x: torch.Tensor, blocks: torch.Tensor, segment: int) -> torch.Tensor:
    """Per expert ``e``: block ``k`` of ``blocks[e]`` rotates coordinates ``k*segment .. k*segment+b-1`` of
    ``x[e]`` (``out_i = sum_j G_ij x_j``), the rest of each segment passes. ``x`` ``(E, T, d)``,
    ``blocks`` ``(E, n, b, b)`` -> ``(E, T, d)``."""
    e, t, d = x.shape
    n, b = blocks.shape[1], blocks.shape[-1]
    parts = x.view(e, t, n, segment)
    rotated = torch.einsum("etkj,ekij->etki", parts[..., :b], blocks.to(x.dtype))
    if segment > b:
        rotated = torch.cat([rotated, parts[..., b:]], dim=-1)
    return rotated.reshape(e, t, d)


def _stack_sides(layers: list, which: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    sides = [getattr(layer, which) for layer in layers]
    return (torch.stack([side.forward_blocks() for side in sides]), torch.stack([side.perm for side in sides]),
            sides[0].segment)


def batched_poet_linear(x: torch.Tensor, layers: list, a0: torch.Tensor) -> torch.Tensor:
    """``P_e A0_e R_e x_e`` for every expert ``e``: ``x`` ``(E, T, d_in)``, ``a0`` ``(E, d_out, d_in)`` the
    stacked pre-permuted ``A0'`` of ``layers`` (one POET layer per expert) -> ``(E, T, d_out)``."""
    e, t, _ = x.shape
    with torch.profiler.record_function("poet::rotate_input"):
        blocks, perm, segment = _stack_sides(layers, "input_side")
        z = _rotate(torch.gather(x, 2, perm[:, None, :].expand(e, t, -1)), blocks, segment)
    with torch.profiler.record_function("poet::frozen_gemm"):
        h = torch.bmm(z, a0.transpose(1, 2))
    with torch.profiler.record_function("poet::rotate_output"):
        blocks, perm, segment = _stack_sides(layers, "output_side")
        inverse = torch.stack([layer.output_side.inv_perm for layer in layers])
        return torch.gather(_rotate(h, blocks, segment), 2, inverse[:, None, :].expand(e, t, -1))


class POETBatchedExperts(SequentialMLP):
    """megatron-core's ``SequentialMLP`` of POET experts, computed batched (see the module docstring).

    Same constructor and forward contract as ``SequentialMLP``: ``forward(tokens (N, h) sorted by
    local expert, tokens_per_expert (E,), probs (N,)) -> (output (N, h), None)``.
    """

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection)
        first = self.local_experts[0]
        problems = [what for what, bad in (
            ("linear biases", first.linear_fc1.bias is not None or first.linear_fc2.bias is not None),
            ("8-bit A0 storage", first.linear_fc1.frozen_scale is not None),
            ("FP8", bool(getattr(config, "fp8", None))),
        ) if bad]
        if problems:
            raise ValueError(f"batched POET experts (--moe-grouped-gemm) do not support {', '.join(problems)}: "
                             "drop --moe-grouped-gemm to run them sequentially")
        self.mode = first.linear_fc1.poet.mode
        for name in LINEARS:  # A0 stacked once; each expert's frozen_weight becomes a view into it
            layers = [getattr(expert, name) for expert in self.local_experts]
            stacked = torch.stack([layer.frozen_weight.detach() for layer in layers])
            for index, layer in enumerate(layers):
                layer.frozen_weight.data = stacked[index]
                layer.output_side.gradient_from_output = False  # autograd gives dL/dG here, not dL/dG G^T
            # (no reference kept here: the experts' parameters are the state, and freeing them frees it)

    @staticmethod
    def _stacked_a0(layers: list) -> torch.Tensor:
        """``(E, d_out, d_in)`` over the one storage the experts' ``A0`` are views of (no copy)."""
        first = layers[0].frozen_weight
        rows, cols = first.shape
        stacked = first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (len(layers), rows, cols),
                                          (rows * cols, cols, 1))
        if any(layer.frozen_weight.data_ptr() != stacked[i].data_ptr() for i, layer in enumerate(layers)):
            raise RuntimeError("an expert's A0 was replaced instead of written in place: the batched experts "
                               "no longer see it")
        return stacked

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        layers = [getattr(expert, name) for expert in self.local_experts]
        stacked = self._stacked_a0(layers)
        if self.mode == "mem" and torch.is_grad_enabled():
            return checkpoint(batched_poet_linear, x, layers, stacked, use_reentrant=False)
        return batched_poet_linear(x, layers, stacked)

    def _activation(self, y: torch.Tensor) -> torch.Tensor:
        """Megatron's MLP activation (unfused path): ``act(gate) * (up + offset)`` with SwiGLU, else ``act``."""
        c = self.config
        if not c.gated_linear_unit:
            return c.activation_func(y)
        gate, up = torch.chunk(y, 2, dim=-1)
        if (clamp := c.activation_func_clamp_value) is not None:
            gate, up = gate.clamp(max=clamp), up.clamp(min=-clamp, max=clamp)
        return c.activation_func(gate) * (up + c.glu_linear_offset)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x, probs = permuted_local_hidden_states, permuted_probs
        if self.config.moe_apply_probs_on_input:
            raise ValueError("batched POET experts do not implement moe_apply_probs_on_input")
        counts = [int(c) for c in tokens_per_expert.tolist()]
        # (at least one padded row: experts without tokens still take part, so every factor of the step
        # gets its (zero) gradient and the step's block gradients are complete, as with sequential experts)
        longest = max(max(counts), 1)
        # padded position of each token: expert e's tokens at rows e*longest .. e*longest + count - 1
        rows = torch.cat([e * longest + torch.arange(c, device=x.device) for e, c in enumerate(counts)])
        padded = x.new_zeros(len(counts) * longest, x.shape[-1]).index_copy(0, rows, x)
        scale = probs.new_zeros(len(counts) * longest).index_copy(0, rows, probs)
        hidden = self._linear("linear_fc1", padded.view(len(counts), longest, -1))
        hidden = (self._activation(hidden) * scale.view(len(counts), longest, 1)).to(x.dtype)
        out = self._linear("linear_fc2", hidden)
        return out.reshape(len(counts) * longest, -1).index_select(0, rows), None
