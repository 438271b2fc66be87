"""One POET layer's FP8 frozen GEMM and its FP8 copies of ``A0'`` (made once per merge, never saved).

:class:`FP8FrozenGemm` is what :func:`megatron_poet.poet.functional.frozen_gemm` and
:func:`~megatron_poet.poet.functional.frozen_gemm_input_grad` call instead of the bf16 GEMM when a
layer has one (``layer.fp8``). It quantizes ``A0'`` lazily, the first time a GEMM needs it, and
keeps the copy until ``A0'`` changes: a merge (``POETModule._merge`` drops it explicitly before
folding, so the old copy never coexists with the fold's temporaries), a checkpoint load (a
``load_state_dict`` post hook drops it), or any other in-place write (detected from the weight's
version counter and storage). The copies are plain attributes of a plain object, so they are in
no ``state_dict``/``sharded_state_dict`` and no checkpoint.

Tensor parallelism: a scale that reduces over a TP-sharded axis is all-reduced (MAX) over the TP
group, so every rank uses the scales the unsharded layer would and TP=2 computes what TP=1 does
(up to the order of float32 sums). Which axes that is depends on the recipe
(:meth:`FP8FrozenGemm.amax_groups`); blockwise scales never need it (tiles stay inside a rank's
permutation groups, :func:`.shape_problems`).
"""
from __future__ import annotations

import torch

from .backends import make_backend


class FP8FrozenGemm:
    """``h = z A0'^T`` and ``dL/dz = dL/dh A0'`` in FP8 for one layer.

    Args:
        fmt, recipe: see :class:`~megatron_poet.poet.fp8.FP8Config`.
        backend: resolved backend name (:func:`.backends.resolve_backend`).
        in_group, out_group: process group over which ``d_in`` / ``d_out`` of ``A0'`` is sharded
            (``None``: not sharded).
        reason: why this backend (for logs).

    Attributes:
        builds: how many times ``A0'`` was quantized (each role counts once per build).
    """

    def __init__(self, fmt: str, recipe: str, backend: str, *, in_group=None, out_group=None, reason: str = ""):
        self.format, self.recipe, self.reason = fmt, recipe, reason
        self.backend = make_backend(backend, fmt, recipe)
        self.in_group, self.out_group = in_group, out_group
        self._copies: dict[str, tuple[tuple, object]] = {}
        self.builds = 0

    def amax_groups(self) -> dict[str, object]:
        """Group each operand's maxima are all-reduced over: the TP group when a reduced axis is sharded.

        Keys: "forward weight" (``A0'`` scaled along ``d_in``; tensorwise: over everything),
        "input_grad weight" (along ``d_out``), "input" (``z`` along ``d_in``), "grad" (along ``d_out``).
        """
        either = self.in_group if self.in_group is not None else self.out_group
        weight = {"tensorwise": (either, either), "rowwise": (self.in_group, self.out_group),
                  "blockwise": (None, None)}[self.recipe]
        tiles = self.recipe == "blockwise"
        return {"forward weight": weight[0], "input_grad weight": weight[1],
                "input": None if tiles else self.in_group, "grad": None if tiles else self.out_group}

    def invalidate(self) -> None:
        """Drop the FP8 copies (``A0'`` was or is about to be rewritten); the next GEMM rebuilds them."""
        self._copies.clear()

    @staticmethod
    def _key(w: torch.Tensor) -> tuple:
        return w.data_ptr(), w._version, w.device, w.dtype, tuple(w.shape)

    @torch.no_grad()
    def weight(self, w: torch.Tensor, role: str):
        """The FP8 copy of ``w`` = ``A0'`` ``(d_out, d_in)`` for ``role`` ("forward" or "input_grad")."""
        key = self._key(w)
        if any(k != key for k, _ in self._copies.values()):
            self._copies.clear()  # A0' changed without an explicit invalidation (version or storage)
        if role not in self._copies:
            derived = role == "input_grad" and self.backend.derives_input_grad_copy
            forward = self.weight(w, "forward") if derived else None
            group = self.amax_groups()[f"{role} weight"]
            self._copies[role] = (key, self.backend.weight_copy(w, role, group, forward))
            self.builds += 1
        return self._copies[role][1]

    def copy_nbytes(self) -> int | None:
        """Bytes held by the FP8 copies now (a view of another copy counts once); ``None`` for TE tensors."""
        if self.backend.name == "te":
            return None
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for _, copy in self._copies.values() for t in (copy.data, copy.scale_inv)}
        return sum(storages.values())

    def forward(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``z A0'^T``: ``(..., d_in) -> (..., d_out)`` in ``z``'s dtype."""
        h = self.backend.forward(z.reshape(-1, z.shape[-1]), self.weight(w, "forward"),
                                 self.amax_groups()["input"], z.dtype)
        return h.view(*z.shape[:-1], h.shape[-1])

    def input_grad(self, grad_h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``grad_h A0'``: ``(..., d_out) -> (..., d_in)`` in ``grad_h``'s dtype (no weight gradient)."""
        g = self.backend.input_grad(grad_h.reshape(-1, grad_h.shape[-1]), self.weight(w, "input_grad"),
                                    self.amax_groups()["grad"], grad_h.dtype)
        return g.view(*grad_h.shape[:-1], g.shape[-1])

    def describe(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        return f"{self.format}, {self.recipe} scales, backend {self.backend.name}{why}"

