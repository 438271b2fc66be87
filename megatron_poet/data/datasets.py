"""Train/valid/test GPT datasets through megatron-core's BlendedMegatronDatasetBuilder.

Real data is validated first (files, index integrity, token ids vs. the tokenizer, non-empty
splits) so that every bad input fails before training with a DataError that says what to fix.
Each sample is a dict of torch tensors (megatron-core GPTDataset): "tokens" and "labels" (s,)
int64 (labels = tokens shifted by one: the dataset reads s + 1 tokens), "loss_mask" (s,)
float, "position_ids" (s,) int64 and, when create_attention_mask, "attention_mask" (1, s, s)
bool with True = masked.

megatron-core caches the sample indices as ``.npy`` files beside the data (or under
``path_to_cache``); they are read with ``allow_pickle=False``
(:func:`megatron_poet.safe_loading.restricted_loading`) while the datasets are built, so a
swapped cache file cannot run code (megatron's ``defer_npy_index_mmap``, which would read
them later, stays off).
"""
import contextlib
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from megatron_poet.safe_loading import UnsafeFileError, restricted_loading

from .validation import DataError, check_indexed_dataset

_SPLIT_NAMES = ("train", "valid", "test")


def parse_data_path(data_path: Union[str, Sequence[str]]
                    ) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron --data-path -> (prefixes, weights or None).

    Accepts "pathA", "pathA pathB" (blended in proportion to their sizes) or
    "0.3 pathA 0.7 pathB" (weights, normalised by megatron), as one string or a list of tokens.
    """
    tokens = [t for item in ([data_path] if isinstance(data_path, str) else data_path)
              for t in item.split()]
    if not tokens:
        raise DataError("--data-path is empty")

    def is_number(token: str) -> bool:
        try:
            float(token)
            return True
        except ValueError:
            return False

    if not is_number(tokens[0]):
        return tokens, None
    weights, prefixes = tokens[0::2], tokens[1::2]
    if len(tokens) % 2 or not all(map(is_number, weights)) or any(map(is_number, prefixes)):
        raise DataError(f"--data-path {' '.join(tokens)!r}: give either prefixes only or "
                        f"weight/prefix pairs like '0.3 pathA 0.7 pathB'")
    weights = [float(w) for w in weights]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise DataError(f"--data-path weights must be >= 0 with a positive sum, got {weights}")
    return prefixes, weights


def _check_splits(prefix: str, documents: int, split: str) -> None:
    """Every split with a nonzero --split weight must get >= 1 document of every prefix:
    megatron-core loops forever sizing an epoch of an empty split."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for name, bounds in zip(_SPLIT_NAMES, matrix):
        if bounds is None:
            continue
        # Same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
        count = int(round(bounds[1] * documents)) - int(round(bounds[0] * documents))
        if count == 0:
            raise DataError(f"--split {split!r} gives the {name} split 0 of the {documents} "
                            f"documents in {prefix}; use more documents or set that split's "
                            f"weight to 0")


@contextlib.contextmanager
def _process_group_for_build():
    """A 1-rank gloo group while building, when none exists.

    megatron-core's BlendedDataset calls torch.distributed.get_rank() on a cache miss when
    path_to_cache is set, which fails without a process group; a HashStore group needs no
    network and is destroyed afterwards.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_train_valid_test_datasets(
        tokenizer, seq_length: int, num_samples: Sequence[Optional[int]],
        data_path: Optional[Union[str, Sequence[str]]] = None, split: str = "949,50,1",
        mock: bool = False, seed: int = 1234, path_to_cache: Optional[str] = None,
        reset_position_ids: bool = False, reset_attention_mask: bool = False,
        eod_mask_loss: bool = False, create_attention_mask: bool = True,
        is_built_on_rank: Optional[Callable[[], bool]] = None,
) -> Tuple[Optional[torch.utils.data.Dataset], ...]:
    """Build (train, valid, test) GPTDatasets (or MockGPTDatasets), blended when several paths.

    Args:
        tokenizer: HFTokenizer / NullTokenizer (anything with vocab_size, eod,
            unique_identifiers).
        seq_length: tokens per sample s.
        num_samples: samples per split (train, valid, test); None = one epoch of that split
            (not allowed with weighted blends). Data is repeated over epochs as needed.
        data_path: Megatron --data-path (see parse_data_path); exclusive with `mock`.
        split: Megatron --split, e.g. "949,50,1" (document fractions of each prefix).
        mock: use megatron-core's MockGPTDataset (synthetic ids below tokenizer.vocab_size).
        seed: seed of the document/sample shuffles.
        path_to_cache: where megatron-core caches the sample indices (.npy); None = its default,
            `{prefix}/cache/GPTDataset_indices` (a directory beside the .bin).
        reset_position_ids, reset_attention_mask, eod_mask_loss, create_attention_mask: as
            megatron's GPTDatasetConfig.
        is_built_on_rank: megatron's callable saying whether this rank builds datasets
            (default: every rank). Under torch.distributed, rank 0 builds the cache first.
    Returns:
        (train, valid, test); an entry is None when its split is empty.
    Raises:
        DataError for missing/corrupt data, a tokenizer smaller than the data's ids, a split
        with no documents, inconsistent arguments, or a cached index holding pickled objects.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    if mock == bool(data_path):
        raise DataError("give exactly one of --data-path and --mock-data")
    if seq_length < 1:
        raise DataError(f"seq_length must be >= 1, got {seq_length}")
    if len(num_samples) != 3:
        raise DataError(f"num_samples must list train, valid, test counts, got {num_samples}")
    blend = None
    if not mock:
        prefixes, weights = parse_data_path(data_path)
        name = getattr(tokenizer, "source", type(tokenizer).__name__)
        for prefix in prefixes:
            summary = check_indexed_dataset(prefix, tokenizer.vocab_size, f"tokenizer {name}",
                                            getattr(tokenizer, "fingerprint", None))
            _check_splits(prefix, summary.documents, split)
        if weights is not None and any(n is None for n in num_samples):
            raise DataError("weighted --data-path blends need a sample count for every split "
                            f"(train, valid, test), got {list(num_samples)}")
        blend = (prefixes, weights)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend,
        split=None if mock else split, path_to_cache=path_to_cache, tokenizer=tokenizer,
        reset_position_ids=reset_position_ids, reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss, create_attention_mask=create_attention_mask)
    builder = BlendedMegatronDatasetBuilder(
        MockGPTDataset if mock else GPTDataset, list(num_samples),
        is_built_on_rank or (lambda: True), config)
    needs_group = blend is not None and len(blend[0]) > 1 and path_to_cache is not None
    try:
        with restricted_loading("the dataset index cache"), \
                _process_group_for_build() if needs_group else contextlib.nullcontext():
            return tuple(builder.build())
    except UnsafeFileError as err:
        raise DataError(f"{err} Delete that file: megatron-core rebuilds its index cache.") from None
