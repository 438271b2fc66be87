"""Checks of megatron .bin/.idx data run before training, with messages that say what to fix.

megatron-core's IndexedDataset reports a missing or damaged file with bare asserts or numpy
buffer errors (and under `python -O` not at all), and a tokenizer smaller than the data's ids
only fails deep inside the embedding lookup; these checks turn both into one clear DataError.
"""
import json
import os
import struct
from dataclasses import dataclass
from typing import Optional

import numpy

# Layout of megatron-core's .idx header (indexed_dataset._IndexWriter): 9-byte magic, u64
# version (1), u8 dtype code, u64 sequence count, u64 document count; then int32 sequence
# lengths, int64 sequence pointers and int64 document indices.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = struct.Struct("<9sQBQQ")
_REPROCESS = "re-run tools/preprocess_data.py to write it again"
# Elements per chunk when scanning a .bin for its largest id (64 Mi: bounded memory).
_SCAN_CHUNK = 1 << 26


class DataError(ValueError):
    """Training data is missing, damaged, or does not match the tokenizer."""


@dataclass
class IndexedDataSummary:
    """What one .bin/.idx pair holds."""

    prefix: str
    documents: int
    sequences: int
    tokens: int
    dtype: type
    max_token_id: int


def meta_path(prefix: str) -> str:
    """Sidecar JSON written by preprocess_corpus next to PREFIX.bin/.idx."""
    return prefix + ".meta.json"


def _read_index_header(idx_path: str):
    """-> (dtype, sequence count, document count); DataError if the .idx is not megatron's."""
    from megatron.core.datasets.indexed_dataset import DType

    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_IDX_HEADER.size)
    if len(head) < _IDX_HEADER.size:
        raise DataError(f"corrupt index {idx_path}: {size} bytes, shorter than the header; "
                        f"{_REPROCESS}")
    magic, version, code, n_seq, n_doc = _IDX_HEADER.unpack(head)
    if magic != _IDX_MAGIC or version != 1:
        raise DataError(f"corrupt index {idx_path}: not a megatron indexed-dataset index "
                        f"(bad header/version); {_REPROCESS}")
    try:
        dtype = DType.dtype_from_code(code)
    except ValueError:
        raise DataError(f"corrupt index {idx_path}: unknown token dtype code {code}; "
                        f"{_REPROCESS}") from None
    expected = _IDX_HEADER.size + n_seq * (4 + 8) + n_doc * 8
    if size != expected:
        raise DataError(f"corrupt index {idx_path}: {size} bytes, but its header describes "
                        f"{n_seq} sequences / {n_doc - 1} documents = {expected} bytes "
                        f"(truncated or overwritten); {_REPROCESS}")
    return dtype, n_seq, n_doc


def check_indexed_dataset(prefix: str, vocab_size: Optional[int] = None,
                          tokenizer_name: str = "the tokenizer",
                          tokenizer_fingerprint: Optional[str] = None) -> IndexedDataSummary:
    """Validate `{prefix}.bin` / `{prefix}.idx` and (optionally) their ids against a vocabulary.

    Checks: both files exist; the .idx header and size are consistent and megatron-core's
    IndexedDataset opens it; the .bin size matches what the index describes; there is at least
    one document; every token id is in [0, vocab_size); and, when PREFIX.meta.json (written by
    preprocessing) and `tokenizer_fingerprint` are both present, that the data was tokenized
    with this vocabulary. The id scan reads the whole .bin (memory-mapped, in chunks), so its
    cost grows with the data size.

    Args:
        prefix: data path prefix, as given to --data-path (without .bin/.idx).
        vocab_size: tokenizer vocabulary size; None skips the id check.
        tokenizer_name: how to name the tokenizer in the error message.
        tokenizer_fingerprint: HFTokenizer.fingerprint of the training tokenizer, or None.
    Raises:
        DataError naming the file and the fix.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    has_bin, has_idx = os.path.isfile(bin_path), os.path.isfile(idx_path)
    if not has_bin and not has_idx:
        hint = ""
        if prefix.endswith((".bin", ".idx")):
            hint = f" (--data-path takes the prefix without the extension: {prefix[:-4]})"
        raise DataError(f"no data at prefix {prefix}: neither {bin_path} nor {idx_path} "
                        f"exists{hint}; create them with tools/preprocess_data.py "
                        f"--output-prefix {prefix}")
    if not has_bin or not has_idx:
        missing, present = (bin_path, idx_path) if not has_bin else (idx_path, bin_path)
        raise DataError(f"{missing} is missing ({present} exists); the two files are written "
                        f"together: {_REPROCESS}")

    dtype, n_seq, n_doc = _read_index_header(idx_path)
    try:
        dataset = IndexedDataset(prefix)
        lengths = numpy.asarray(dataset.sequence_lengths, dtype=numpy.int64)
        pointers = numpy.asarray(dataset.index.sequence_pointers)
        documents = len(dataset.document_indices) - 1
    except Exception as err:  # megatron raises bare asserts / numpy errors on damaged files
        raise DataError(f"corrupt index {idx_path}: megatron-core cannot read it "
                        f"({type(err).__name__}: {err}); {_REPROCESS}") from err
    if n_seq == 0 or documents < 1:
        raise DataError(f"{idx_path} holds no documents; {_REPROCESS} from a non-empty corpus")
    if (lengths < 0).any() or (numpy.diff(pointers) != lengths[:-1] * dtype().itemsize).any():
        raise DataError(f"corrupt index {idx_path}: sequence lengths and pointers disagree; "
                        f"{_REPROCESS}")
    expected_bin = int(pointers[-1] + lengths[-1] * dtype().itemsize)
    bin_size = os.path.getsize(bin_path)
    if bin_size != expected_bin:
        raise DataError(f"{bin_path} has {bin_size} bytes but {idx_path} describes "
                        f"{expected_bin}: the files are truncated or from different runs; "
                        f"{_REPROCESS}")

    tokens = numpy.memmap(bin_path, dtype=dtype, mode="r")
    max_id, min_id = -1, 0
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = tokens[start:start + _SCAN_CHUNK]
        max_id = max(max_id, int(chunk.max()))
        min_id = min(min_id, int(chunk.min()))
    if min_id < 0:
        raise DataError(f"corrupt data {bin_path}: negative token id {min_id}; {_REPROCESS}")
    if vocab_size is not None and max_id >= vocab_size:
        raise DataError(f"tokenizer/data mismatch: {bin_path} holds token id {max_id} but "
                        f"{tokenizer_name} has only {vocab_size} ids (0..{vocab_size - 1}). "
                        f"Use the tokenizer the data was preprocessed with (--train-tokenizer "
                        f"saves it as {prefix}_tokenizer/), or re-run tools/preprocess_data.py "
                        f"with this tokenizer.")
    if tokenizer_fingerprint is not None and os.path.isfile(meta_path(prefix)):
        with open(meta_path(prefix), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("tokenizer_fingerprint") not in (None, tokenizer_fingerprint):
            used = os.path.join(os.path.dirname(os.path.abspath(prefix)),
                                meta.get("tokenizer_path", "?"))
            raise DataError(f"tokenizer/data mismatch: {prefix} was tokenized with "
                            f"{used} ({meta.get('tokenizer_vocab_size')} "
                            f"ids) but training uses {tokenizer_name} ({vocab_size} ids), whose "
                            f"vocabulary differs. Pass the tokenizer the data was preprocessed "
                            f"with, or re-run tools/preprocess_data.py with this one.")
    return IndexedDataSummary(prefix, documents, n_seq, int(lengths.sum()), dtype, max_id)
