"""Megatron-style pretraining data loader: sequential micro-batches, exact resume.

The GPT datasets are already shuffled by their shuffle index, so samples are read in order;
`consumed_samples` (samples of all data-parallel ranks already trained on, as Megatron counts
them) makes a resumed run see exactly the batches an uninterrupted run would have seen next.
"""
from typing import Iterator, List

import torch


class PretrainingBatchSampler:
    """Yields this rank's micro-batches (lists of dataset indices) from `consumed_samples` on.

    Global batch k covers indices [c + k*m*d, c + (k+1)*m*d) with c = consumed_samples,
    m = micro_batch_size, d = data_parallel_size; rank r takes its r-th slice of m indices.
    An incomplete last global batch is dropped so every rank runs the same number of steps.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int = 0, data_parallel_size: int = 1):
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError(f"micro_batch_size and data_parallel_size must be >= 1, got "
                             f"{micro_batch_size}, {data_parallel_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} not in "
                             f"[0, {data_parallel_size})")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"cannot resume at consumed_samples={consumed_samples}: the dataset "
                             f"has {total_samples} samples (was it built for fewer training "
                             f"samples than the checkpointed run?)")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.global_micro_batch = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.global_micro_batch

    def __iter__(self) -> Iterator[List[int]]:
        first = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        for k in range(len(self)):
            start = first + k * self.global_micro_batch
            yield list(range(start, start + self.micro_batch_size))


def build_pretraining_data_loader(dataset, consumed_samples: int, micro_batch_size: int,
                                  data_parallel_rank: int = 0, data_parallel_size: int = 1,
                                  num_workers: int = 0) -> torch.utils.data.DataLoader:
    """DataLoader over `dataset` yielding dicts of stacked tensors, e.g. tokens (m, s).

    Args:
        dataset: a megatron-core GPT/Blended dataset (or any map-style dataset).
        consumed_samples: samples (all ranks) already consumed; 0 for a fresh run.
        micro_batch_size: m, samples per rank per step.
        data_parallel_rank, data_parallel_size: this rank's data-parallel position.
        num_workers: DataLoader worker processes (0 = load in the training process).
    """
    sampler = PretrainingBatchSampler(len(dataset), consumed_samples, micro_batch_size,
                                      data_parallel_rank, data_parallel_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       persistent_workers=num_workers > 0)
