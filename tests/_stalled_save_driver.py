"""The pretraining program, except that background checkpoint writes of iteration ``STALL_SAVE_FROM``
and later never finish: the writer process (forked by megatron-core's async save) waits until its rank
dies, then dies with it, as a scheduler's kill of the whole job would end it mid-write.
"""
import os
import sys
import time

from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

from megatron_poet.checkpoint import DistFormat
from megatron_poet.training.process import request_death_signal

STALL_FROM = int(os.environ["STALL_SAVE_FROM"])
original_write = FileSystemWriterAsync.write_preloaded_data_multiproc
original_save = DistFormat.save


def stalled_write(*args, **kwargs):
    request_death_signal()
    time.sleep(600)


def save(self, engine, iteration, consumed_samples):
    stall = iteration >= STALL_FROM
    if stall:  # the writer is forked inside save(): it inherits this
        FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(stalled_write)
    try:
        return original_save(self, engine, iteration, consumed_samples)
    finally:
        FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(original_write)


DistFormat.save = save

if __name__ == "__main__":
    from megatron_poet.training.pretrain import main

    sys.exit(main(sys.argv[1:]))
