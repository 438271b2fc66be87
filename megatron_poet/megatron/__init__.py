"""megatron-core integration: POET tensor-parallel linears, GPT layer specs, model builders.

Modules (import them directly; importing this package does not import megatron):
- ``cpu_backend``: run megatron-core on CPU/gloo when CUDA is absent.
- ``compat``: the megatron-core 0.16 / 0.19 differences.
- ``sharding``: layout-independent permutations of the TP-sharded side.
- ``layers``: ``POETColumnParallelLinear``, ``POETRowParallelLinear``.
- ``spec``: GPT layer specs with POET linears.
- ``model``: Llama-style and GPT-2-style GPTModel builders.
- ``optimizer_state``: merge-time reset of the POET factors' state in megatron optimizers.
"""
