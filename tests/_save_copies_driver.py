"""The pretraining program, printing before each checkpoint save the bytes megatron-core's writer copies:
``FileSystemWriterAsync.prepare_write_data`` clones every CPU tensor of the save plan that views part of a
larger storage (its own criterion, repeated here) before it writes anything, so those copies coexist.
"""
import sys

from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from torch.distributed.checkpoint.planner import WriteItemType

original_prepare = FileSystemWriterAsync.prepare_write_data


def prepare_write_data(self, plan, planner):
    copied = 0
    for item in plan.items:
        if item.type != WriteItemType.BYTE_IO:
            tensor = planner.resolve_data(item).detach()
            if tensor.untyped_storage().nbytes() != tensor.nbytes:
                copied += tensor.nbytes
    print(f"save copies {copied} bytes", flush=True)
    return original_prepare(self, plan, planner)


FileSystemWriterAsync.prepare_write_data = prepare_write_data

if __name__ == "__main__":
    from megatron_poet.training.pretrain import main

    sys.exit(main(sys.argv[1:]))
