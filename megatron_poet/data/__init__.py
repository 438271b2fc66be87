"""Pretraining data: tokenizers, corpus preprocessing to megatron .bin/.idx, validated
megatron-core GPT datasets, resumable data loaders and the built-in default corpus."""
from .datasets import build_train_valid_test_datasets, parse_data_path
from .default_corpus import prepare_default_data
from .loader import PretrainingBatchSampler, build_pretraining_data_loader
from .preprocess import InputError, PreprocessStats, preprocess_corpus
from .tokenizer import (EOD_TOKEN, HFTokenizer, NullTokenizer, build_tokenizer,
                        load_hf_tokenizer, train_byte_level_bpe)
from .validation import DataError, check_indexed_dataset

__all__ = [
    "DataError",
    "EOD_TOKEN",
    "HFTokenizer",
    "InputError",
    "NullTokenizer",
    "PreprocessStats",
    "PretrainingBatchSampler",
    "build_pretraining_data_loader",
    "build_tokenizer",
    "build_train_valid_test_datasets",
    "check_indexed_dataset",
    "load_hf_tokenizer",
    "parse_data_path",
    "prepare_default_data",
    "preprocess_corpus",
    "train_byte_level_bpe",
]
