"""megatron_poet: Megatron-style LLM pretraining with POET / POET-X linear layers."""
from .poet.cayley import cayley_neumann, orthogonality_error
from .poet.config import POETConfig
from .poet.convert import convert_model
from .poet.linear import POETLinear, POETModule
from .poet.optim import MergeScheduler, poet_modules, poet_param_groups

__all__ = [
    "POETConfig",
    "POETLinear",
    "POETModule",
    "MergeScheduler",
    "cayley_neumann",
    "convert_model",
    "orthogonality_error",
    "poet_modules",
    "poet_param_groups",
]
__version__ = "0.1.0"
