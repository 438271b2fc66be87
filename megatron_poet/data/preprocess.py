"""Text / JSONL corpus -> megatron-core indexed dataset (.bin/.idx), tokenized with a HF tokenizer.

Document units:
  * plain text: one document per paragraph; paragraphs are separated by one or more blank
    (empty or whitespace-only) lines, and a document is its lines joined by "\\n" without the
    trailing newline. Files are read as UTF-8 with universal newlines.
  * JSONL: one JSON object per line, the document is `obj[json_key]` (a string); blank lines
    are skipped.
Empty documents are skipped (megatron's sample index cannot use zero-length documents).
Besides PREFIX.bin/.idx, PREFIX.meta.json records the tokenizer (path, vocabulary fingerprint,
size) so training can refuse a different tokenizer.
"""
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import numpy

from .tokenizer import HFTokenizer, load_hf_tokenizer, train_byte_level_bpe
from .validation import meta_path

JSONL_EXTENSIONS = (".jsonl", ".json", ".ndjson")


class InputError(ValueError):
    """The corpus cannot be read; the message names the file (and line) and what to fix."""


@dataclass
class PreprocessStats:
    """What preprocess_corpus wrote. Paths are absolute; seconds is wall time of tokenization."""

    bin_path: str
    idx_path: str
    tokenizer_path: str
    documents: int
    skipped_empty: int
    tokens: int
    max_token_id: int
    seconds: float

    def summary(self) -> str:
        """One human-readable paragraph with throughput."""
        s = max(self.seconds, 1e-9)
        return (f"wrote {self.documents} documents, {self.tokens} tokens "
                f"({self.skipped_empty} empty documents skipped) in {self.seconds:.1f}s: "
                f"{self.documents / s:.0f} docs/s, {self.tokens / s:.0f} tokens/s\n"
                f"  data: {self.bin_path}\n  index: {self.idx_path}\n"
                f"  metadata: {meta_path(self.bin_path[:-len('.bin')])}\n"
                f"  tokenizer: {self.tokenizer_path}")


def resolve_input_format(path: str, input_format: str) -> str:
    """"auto" -> "jsonl" for .jsonl/.json/.ndjson files, else "text"."""
    if input_format == "auto":
        return "jsonl" if path.lower().endswith(JSONL_EXTENSIONS) else "text"
    if input_format not in ("text", "jsonl"):
        raise ValueError(f"input format must be auto, text or jsonl, got {input_format!r}")
    return input_format


def _iter_lines(path: str) -> Iterator[Tuple[int, str, int]]:
    """Yields (1-based line number, line without its newline, bytes consumed)."""
    if not os.path.isfile(path):
        raise InputError(f"input file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lineno = 0
        try:
            for lineno, line in enumerate(f, 1):
                yield lineno, line.rstrip("\n"), len(line.encode("utf-8"))
        except UnicodeDecodeError as err:
            raise InputError(f"{path}:{lineno + 1}: not valid UTF-8 ({err.reason}); convert the "
                             f"file to UTF-8") from err


def iter_documents(path: str, input_format: str = "auto", json_key: str = "text"
                   ) -> Iterator[Tuple[str, int]]:
    """Yields (document text, input bytes consumed since the previous document).

    See the module docstring for what a document is. Raises InputError for a missing file,
    invalid UTF-8, a malformed JSON line or a missing/non-string `json_key` (with file:line).
    """
    fmt = resolve_input_format(path, input_format)
    pending = 0
    if fmt == "jsonl":
        for lineno, line, nbytes in _iter_lines(path):
            pending += nbytes
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: invalid JSON ({err.msg} at column "
                                 f"{err.colno}); each line must be one JSON object") from err
            if not isinstance(obj, dict) or json_key not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise InputError(f"{path}:{lineno}: no key {json_key!r} (found {keys}); pass "
                                 f"the key holding the text with --json-key")
            text = obj[json_key]
            if not isinstance(text, str):
                raise InputError(f"{path}:{lineno}: {json_key!r} is a "
                                 f"{type(text).__name__}, expected a string")
            yield text, pending
            pending = 0
    else:
        paragraph: List[str] = []
        for _, line, nbytes in _iter_lines(path):
            pending += nbytes
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "\n".join(paragraph), pending
                paragraph, pending = [], 0
        if paragraph:
            yield "\n".join(paragraph), pending


def _chunks(docs: Iterator[Tuple[str, int]], size: int) -> Iterator[Tuple[List[str], int]]:
    """Groups documents into lists of `size` for batch encoding; sums their input bytes."""
    texts: List[str] = []
    nbytes = 0
    for text, n in docs:
        texts.append(text)
        nbytes += n
        if len(texts) == size:
            yield texts, nbytes
            texts, nbytes = [], 0
    if texts or nbytes:
        yield texts, nbytes


_worker_tokenizer: Optional[HFTokenizer] = None


def _init_worker(tokenizer: HFTokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_chunk(chunk: Tuple[List[str], int]) -> Tuple[List[List[int]], int]:
    texts, nbytes = chunk
    return _worker_tokenizer.tokenize_batch(texts), nbytes


def _train_tokenizer(input_path: str, input_format: str, json_key: str, vocab_size: int, out_dir: str,
                     progress: bool) -> str:
    """train_byte_level_bpe over the corpus, with a bar over the input bytes while the trainer reads
    them, then a line while it computes the merges (no callback reaches into that phase)."""
    from tqdm import tqdm

    start = time.time()
    bar = tqdm(total=os.path.getsize(input_path), unit="B", unit_scale=True, desc="training tokenizer: reading",
               disable=not progress)

    def texts() -> Iterator[str]:
        for text, nbytes in iter_documents(input_path, input_format, json_key):
            bar.update(nbytes)
            yield text
        bar.close()
        if progress:
            print(f"training tokenizer: computing the merges of a {vocab_size}-token vocabulary ...",
                  file=sys.stderr, flush=True)

    try:
        path = train_byte_level_bpe(texts(), vocab_size, out_dir)
    finally:
        bar.close()
    if progress:
        print(f"training tokenizer: done in {time.time() - start:.1f}s, saved to {out_dir}", file=sys.stderr,
              flush=True)
    return path


def preprocess_corpus(input_path: str, output_prefix: str, tokenizer: Optional[str] = None,
                      train_tokenizer_vocab_size: Optional[int] = None,
                      input_format: str = "auto", json_key: str = "text",
                      append_eod: bool = False, workers: int = 1, chunk_size: int = 512,
                      progress: bool = True) -> PreprocessStats:
    """Tokenize a corpus into `{output_prefix}.bin` / `{output_prefix}.idx`.

    Each document becomes one sequence (and one megatron document) of token ids, stored as
    uint16 when the vocabulary has < 65500 ids, else int32 (megatron's DType.optimal_dtype).

    Args:
        input_path: text or JSONL file (see module docstring).
        output_prefix: output path without extension; its directory is created.
        tokenizer: tokenizer.json file or directory. Exactly one of `tokenizer` and
            `train_tokenizer_vocab_size` must be given.
        train_tokenizer_vocab_size: train a byte-level BPE of this size on the input first and
            save it to `{output_prefix}_tokenizer/`.
        input_format: "auto" (by extension), "text" or "jsonl".
        json_key: JSONL field holding the text.
        append_eod: append the tokenizer's end-of-document id to every document.
        workers: processes encoding in parallel (1: in this process; the Rust backend already
            uses threads within a batch).
        chunk_size: documents per encode batch.
        progress: show progress on stderr: tokenizer training (input bytes read, then the merges),
            tokenization (a tqdm bar of input bytes, with docs/s and tokens/s).
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    if (tokenizer is None) == (train_tokenizer_vocab_size is None):
        raise ValueError("give exactly one of --tokenizer PATH and --train-tokenizer VOCAB_SIZE")
    if not os.path.isfile(input_path):
        raise InputError(f"input file not found: {input_path}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    if train_tokenizer_vocab_size is not None:
        tokenizer = _train_tokenizer(input_path, input_format, json_key, train_tokenizer_vocab_size,
                                     f"{output_prefix}_tokenizer", progress)
    tok = load_hf_tokenizer(tokenizer)
    dtype = DType.optimal_dtype(tok.vocab_size)

    bin_path, idx_path = f"{output_prefix}.bin", f"{output_prefix}.idx"
    # Written under temporary names and renamed at the end, so an interrupted run leaves no
    # .bin/.idx pair that looks complete.
    builder = IndexedDatasetBuilder(bin_path + ".tmp", dtype=dtype)
    documents = skipped = tokens = 0
    max_id = -1
    chunks = _chunks(iter_documents(input_path, input_format, json_key), chunk_size)
    pool = multiprocessing.Pool(workers, _init_worker, (tok,)) if workers > 1 else None
    if pool is None:
        _init_worker(tok)
    encoded = pool.imap(_encode_chunk, chunks) if pool else map(_encode_chunk, chunks)
    start = time.time()
    bar = tqdm(total=os.path.getsize(input_path), unit="B", unit_scale=True, desc="tokenizing",
               disable=not progress)
    try:
        for ids_list, nbytes in encoded:
            for ids in ids_list:
                if not ids:
                    skipped += 1
                    continue
                if append_eod:
                    ids = ids + [tok.eod]
                builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
                documents += 1
                tokens += len(ids)
                max_id = max(max_id, max(ids))
            bar.update(nbytes)
            elapsed = max(time.time() - start, 1e-9)
            bar.set_postfix(docs_per_s=f"{documents / elapsed:.0f}",
                            tokens_per_s=f"{tokens / elapsed:.0f}", refresh=False)
        if documents == 0:
            raise InputError(f"{input_path} holds no non-empty documents")
        builder.finalize(idx_path + ".tmp")
    except BaseException:
        builder.data_file.close()
        for path in (bin_path + ".tmp", idx_path + ".tmp"):
            if os.path.exists(path):
                os.remove(path)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    os.replace(bin_path + ".tmp", bin_path)
    os.replace(idx_path + ".tmp", idx_path)
    # Relative when the tokenizer sits beside the data (--train-tokenizer), so the record stays
    # right when the directory is moved or renamed (prepare_default_data renames it).
    tok_rel = os.path.relpath(tok.source, out_dir)
    meta = {"tokenizer_path": tok.source if tok_rel.startswith("..") else tok_rel,
            "tokenizer_fingerprint": tok.fingerprint,
            "tokenizer_vocab_size": tok.vocab_size, "eod": tok.eod, "append_eod": append_eod,
            "documents": documents, "tokens": tokens, "input": os.path.abspath(input_path)}
    with open(meta_path(output_prefix), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    return PreprocessStats(os.path.abspath(bin_path), os.path.abspath(idx_path),
                           tok.source, documents, skipped, tokens, max_id, time.time() - start)

