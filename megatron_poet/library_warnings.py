"""Silence the library warnings we know to be harmless, and only those.

A run on a machine without Transformer Engine or Apex (every CPU, many GPUs)
otherwise starts with a screen of megatron-core import warnings, and every
checkpoint load adds torch deprecation notices about megatron's own calls. Each
filter below names the message and the module that issues it, so a new or
different warning still shows.
"""
from __future__ import annotations

import warnings

# (category, message regex (matched at the start), module regex, why it is harmless)
KNOWN_WARNINGS = (
    (UserWarning, r"Transformer Engine and Apex are not installed", r"megatron\.core",
     "megatron-core falls back to its PyTorch implementations; the program is written for them"),
    (UserWarning, r"Apex is not installed", r"megatron\.core",
     "megatron-core uses torch's LayerNorm/RMSNorm instead of Apex's fused ones"),
    (UserWarning, r"full scope is deprecated", r"megatron\.core\.transformer\.transformer_config",
     "megatron-core 0.16's own default cuda_graph_scope triggers it; CUDA graphs are not used"),
    (FutureWarning, r"`load_state_dict` is deprecated", r"megatron\.core\.dist_checkpointing",
     "megatron-core's dist_checkpointing calls the torch API it wraps; nothing for the user to change"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor",
     r"torch\.distributed\.checkpoint",
     "raised inside torch.distributed.checkpoint while it reads megatron's ShardedTensor checkpoints"),
)


def filter_known_warnings() -> None:
    """Install the filters of :data:`KNOWN_WARNINGS` (idempotent: ``warnings`` drops duplicates)."""
    for category, message, module, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
