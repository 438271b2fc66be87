"""POET math in plain PyTorch: nothing in this package knows about Megatron."""
