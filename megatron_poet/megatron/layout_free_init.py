"""One model per seed: initial values that depend on ``(seed, global tensor identity)`` only.

Megatron draws its random initial weights (embeddings, the output layer, the baseline's
linears) from a generator whose stream depends on the parallel layout: which stage builds
which layers, in which order, with which tensor-parallel rank offset. The builders of
:mod:`.model` instead

1. record, while megatron-core builds the model, which init function (``config.init_method``,
   ``output_layer_init_method``, ``embedding_init_method``) it applied to which parameter
   (:func:`recording_init_methods`), then
2. redraw each of those parameters with the same function on its full, unsharded tensor
   from a CPU generator seeded by ``(seed, global name)``, and keep this rank's shard
   (:func:`redraw_parameters`; megatron's ``partition_dim``/``partition_stride`` layout).

The global name replaces the stage-local layer index by the layer's global number, so a
parameter gets the same values at any TP, PP, virtual-PP and DP layout. Parameters megatron
initializes without randomness (norm weights, biases) already agree. POET layers draw ``A0``
and their permutations from ``(seed, global layer name)`` themselves (``initialize_poet_layers``).
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

from .moe import global_expert_paths, is_expert_parameter
from .sharding import mix_seed
from .vocab_padding import VOCABULARY_PARAMETERS

# Parameter attribute naming the init function megatron applied (set only while building).
_INIT_ATTR = "_layout_free_init_method"
_INIT_METHODS = ("init_method", "output_layer_init_method", "embedding_init_method")
# Identity of the word embeddings: a pipeline's last stage holds a tied copy of them.
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


def global_names(model: nn.Module) -> Callable[[str], str]:
    """``fn(local module/parameter path) -> layout-independent name``.

    ``decoder.layers.<local index>.rest`` becomes ``layer<global layer_number>.rest``
    (megatron's ``TransformerLayer.layer_number`` already counts the pipeline offset), and an MoE
    layer's ``experts.local_experts.<local index>`` its ``experts.<global expert index>``
    (:func:`.moe.global_expert_paths`); other paths are unchanged.
    """
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layers = {name: m.layer_number for name, m in model.named_modules() if isinstance(m, TransformerLayer)}
    expert_path = global_expert_paths(model)

    def name_of(path: str) -> str:
        path = expert_path(path)
        owner = max((p for p in layers if path.startswith(p + ".")), key=len, default=None)
        return path if owner is None else f"layer{layers[owner]}{path[len(owner):]}"

    return name_of


@contextlib.contextmanager
def recording_init_methods(config) -> Iterator[None]:
    """While building a model under this context, every parameter megatron initializes through
    ``config``'s init methods is tagged with the function used.

    ``use_cpu_initialization`` is off meanwhile (megatron would then initialize a temporary full
    copy instead of the parameter; :func:`redraw_parameters` draws full tensors on the CPU anyway).
    ``config`` is restored on exit.
    """
    originals = {name: getattr(config, name) for name in (*_INIT_METHODS, "use_cpu_initialization")}

    def tagging(fn):
        def init(tensor):
            setattr(tensor, _INIT_ATTR, fn)
            return fn(tensor)
        return init

    for name in _INIT_METHODS:
        if originals[name] is not None:
            setattr(config, name, tagging(originals[name]))
    config.use_cpu_initialization = False
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(config, name, value)


# Write access to the full values of parameters: for a model built partitioned (DeepSpeed ZeRO-3's
# ``zero.Init``), gathers them for the duration and keeps what is written; by default, nothing to do.
FullParameters = Callable[[list[nn.Parameter]], ContextManager]


def already_full(params: list[nn.Parameter]) -> ContextManager:
    """The :data:`FullParameters` of a model built whole."""
    return contextlib.nullcontext()


def _shard(full: torch.Tensor, param: nn.Parameter, tp_size: int, tp_rank: int) -> torch.Tensor:
    """This rank's part of ``full`` in megatron's layout: the ``full`` tensor is cut along
    ``partition_dim`` into ``tp_size x stride`` pieces and rank ``r`` holds pieces ``r, r + tp, ...``
    (stride 2: SwiGLU's gate and up halves)."""
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = torch.split(full, param.shape[dim] // stride, dim=dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


@torch.no_grad()
def redraw_parameters(model: nn.Module, seed: int, vocab_size: int | None = None,
                      full_parameters: FullParameters = already_full) -> list[str]:
    """Redraw every parameter tagged by :func:`recording_init_methods` from ``(seed, global name)``.

    Each is drawn in full (float32, on the CPU, like megatron's ``use_cpu_initialization``),
    sharded as megatron shards it and copied in; the tag is removed. The default generator's
    state is left as it was. Returns the global names redrawn. With ``vocab_size`` (the real
    vocabulary), the embedding and output layer draw only their first ``vocab_size`` rows and
    the padding rows are zero (:mod:`.vocab_padding`), so the padding leaves the real rows alone.
    ``full_parameters``: for a model built partitioned, gives each parameter's full value while it is
    redrawn (:data:`FullParameters`).

    Raises RuntimeError if a 2-D parameter outside the POET layers was initialized in another
    way (it would make the model depend on the layout).
    """
    from megatron.core import parallel_state

    from .layers import _POETParallelLinear

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    expert_tp = (parallel_state.get_expert_tensor_parallel_world_size(), parallel_state.get_expert_tensor_parallel_rank())
    config = model.config
    name_of = global_names(model)
    poet = {id(p) for m in model.modules() if isinstance(m, _POETParallelLinear) for p in m.parameters()}
    redrawn, untracked = [], []
    for path, param in model.named_parameters():
        init = getattr(param, _INIT_ATTR, None)
        if init is None:
            # (a partitioned parameter is flat here, so only whole builds, same code, run this check)
            if param.dim() >= 2 and id(param) not in poet and config.perform_initialization:
                untracked.append(path)
            continue
        delattr(param, _INIT_ATTR)
        name = name_of(path)
        if getattr(param, "shared_embedding", False):  # the last stage's copy of tied word embeddings
            name, init = WORD_EMBEDDINGS, config.embedding_init_method
        with full_parameters([param]):
            shape = list(param.shape)
            split, rank = expert_tp if is_expert_parameter(param) else (tp_size, tp_rank)  # experts: over expert TP
            if getattr(param, "tensor_model_parallel", False):
                shape[param.partition_dim] *= split
            full = torch.zeros(shape, dtype=torch.float32)
            drawn = full[:vocab_size] if vocab_size is not None and name in VOCABULARY_PARAMETERS else full
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(mix_seed(seed, "parameter", name))
                init(drawn)
            param.copy_(_shard(full, param, split, rank))
        redrawn.append(name)
    if untracked:
        raise RuntimeError(
            "these parameters were initialized outside megatron's config init methods, so their values would "
            f"depend on the parallel layout: {untracked}")
    return redrawn
