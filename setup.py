from setuptools import find_packages, setup

setup(
    name="megatron-poet",
    version="0.1.0",
    description="Megatron-style LLM pretraining with POET / POET-X orthogonal-equivalence linear layers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` installs as `megatron_poet.kernels` (a PyPI package named `kernels` exists).
    packages=find_packages(include=["megatron_poet", "megatron_poet.*"]) + ["megatron_poet.kernels"],
    package_dir={"megatron_poet.kernels": "kernels"},
    install_requires=[
        # Capped: an uncapped torch pulls a multi-GB CUDA build onto CPU machines;
        # 2.13.0 (CPU build here) and 2.11 (GPU machines) both satisfy it.
        "torch>=2.4,<2.14",
        # 0.16.1 is the newest for Python 3.11; 0.17+ (Python 3.12) up to 0.19.x are supported too.
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "triton>=3.0; platform_system == 'Linux'",
        "psutil",  # megatron dist_checkpointing needs it (undeclared); without it a save hangs
        "tokenizers",
        "safetensors",
        "huggingface_hub",  # shard planning of the export (transformers depends on it too)
        "transformers",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        # wandb: the W&B tests run it offline (nothing is sent).
        "test": ["pytest", "pytest-timeout", "wandb"],
        "wandb": ["wandb"],
        # The DeepSpeed engine reaches into ZeRO optimizers' internals (megatron_poet/training/engine/
        # deepspeed_state.py): tested with 0.19.8; before it, the engine casts every buffer of a bf16 model to
        # bf16 (POET's initial row norms are kept in fp32).
        "deepspeed": ["deepspeed>=0.19.8,<0.20"],
        "te": ["transformer-engine[pytorch]"],
    },
)
