#!/usr/bin/env python
"""Tokenize a text or JSONL corpus into megatron-core .bin/.idx files.

  python tools/preprocess_data.py --input corpus.txt --output-prefix data/corpus \
      --train-tokenizer 8192 --append-eod
  python tools/preprocess_data.py --input corpus.jsonl --json-key text \
      --output-prefix data/corpus --tokenizer path/to/tokenizer.json --append-eod --workers 4

Text files: one document per paragraph (paragraphs separated by blank lines). JSONL: one JSON
object per line, the text under --json-key. Writes PREFIX.bin and PREFIX.idx; train with
--data-path PREFIX. --train-tokenizer saves the new tokenizer to PREFIX_tokenizer/.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_poet.library_warnings import filter_known_warnings  # noqa: E402

filter_known_warnings()  # before megatron-core is imported
from megatron_poet.data.preprocess import InputError, preprocess_corpus  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="text or JSONL file")
    parser.add_argument("--output-prefix", required=True,
                        help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    tok = parser.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="tokenizer.json file or Hugging Face tokenizer directory")
    tok.add_argument("--train-tokenizer", type=int, metavar="VOCAB_SIZE",
                     help="train a byte-level BPE of this size on the input first (offline)")
    parser.add_argument("--input-format", choices=("auto", "text", "jsonl"), default="auto",
                        help="auto: JSONL for .jsonl/.json/.ndjson, else text")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text")
    parser.add_argument("--append-eod", action="store_true",
                        help="append the end-of-document token to every document")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        stats = preprocess_corpus(
            args.input, args.output_prefix, tokenizer=args.tokenizer,
            train_tokenizer_vocab_size=args.train_tokenizer, input_format=args.input_format,
            json_key=args.json_key, append_eod=args.append_eod, workers=args.workers,
            progress=not args.no_progress)
    except (InputError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
