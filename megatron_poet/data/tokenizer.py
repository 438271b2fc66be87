"""Tokenizers for pretraining data: Hugging Face (tokenizer.json / directory) and a null tokenizer.

Both classes satisfy what megatron-core 0.16.1's GPTDataset / MockGPTDataset read from
`GPTDatasetConfig.tokenizer` (duck-typed, as in Megatron-LM's legacy tokenizers):
`vocab_size` (int), `eod` (int), `unique_identifiers` (JSON-serialisable dict: it enters the
hash that names the cached sample indices) and an optional `pad` that raises AttributeError when
the tokenizer has no pad token (megatron then masks nothing as padding).
"""
import hashlib
import json
import os
from collections import OrderedDict
from typing import Iterable, List, Optional, Sequence

# GPT-2's end-of-text token: the one special token of the byte-level BPEs trained here.
EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens of common tokenizers, tried in order when the tokenizer's own config
# does not name an eos token (e.g. a bare tokenizer.json).
_KNOWN_EOD_TOKENS = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "NullTokenizer")


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer` behind Megatron's tokenizer interface.

    Args:
        backend: the `tokenizers.Tokenizer` doing the work.
        eod_token: the end-of-document token; it must be in the vocabulary.
        source: the path the tokenizer was loaded from (recorded in `unique_identifiers`).
        pad_token: optional pad token (kept distinct from eod so megatron can mask it).
    """

    def __init__(self, backend, eod_token: str, source: str, pad_token: Optional[str] = None):
        self.backend = backend
        self.source = source
        eod = backend.token_to_id(eod_token)
        if eod is None:
            raise ValueError(f"tokenizer {source}: end-of-document token {eod_token!r} is not in "
                             f"its vocabulary")
        self.eod_token = eod_token
        self._eod = eod
        self._pad = backend.token_to_id(pad_token) if pad_token else None
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", [source]),
             ("vocab_size", self.vocab_size), ("eod", eod)])

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included (before any Megatron padding)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict:
        """Token string -> id."""
        return self.backend.get_vocab(with_added_tokens=True)

    @property
    def eod(self) -> int:
        """End-of-document id, appended after each document by preprocessing."""
        return self._eod

    @property
    def fingerprint(self) -> str:
        """Short hash of the vocabulary (token -> id), recorded with preprocessed data so that
        training with a different tokenizer is caught even when the ids fit its vocabulary."""
        blob = json.dumps(self.vocab, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def pad(self) -> int:
        """Pad id; AttributeError when the tokenizer defines none."""
        if self._pad is None:
            raise AttributeError(f"tokenizer {self.source} has no pad token")
        return self._pad

    def tokenize(self, text: str) -> List[int]:
        """Text -> token ids, without special tokens (no BOS/EOS added)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Many texts -> token ids; the Rust backend encodes them in parallel threads."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Iterable[int]) -> str:
        """Token ids (list or 1-D array) -> text; special tokens are kept so eod stays visible."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


class NullTokenizer:
    """Megatron's NullTokenizer: text is space-separated ids; `vocab_size` ids plus an eod.

    For --mock-data runs, where no real tokenizer is needed. As in Megatron-LM the eod id is
    `vocab_size` (one past the given ids), so the full vocabulary has vocab_size + 1 entries.
    """

    def __init__(self, vocab_size: int):
        if vocab_size < 1:
            raise ValueError(f"NullTokenizer needs --vocab-size >= 1, got {vocab_size}")
        self._n = int(vocab_size)
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("vocab_size", self._n)])

    @property
    def vocab_size(self) -> int:
        """Given vocab size + 1 for the eod token."""
        return self._n + 1

    @property
    def eod(self) -> int:
        """End-of-document id (= the given vocab size)."""
        return self._n

    def tokenize(self, text: str) -> List[int]:
        """"3 1 4" -> [3, 1, 4]."""
        return [int(t) for t in text.split()]

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Many texts -> token ids."""
        return [self.tokenize(t) for t in texts]

    def detokenize(self, ids: Iterable[int]) -> str:
        """[3, 1, 4] -> "3 1 4"."""
        return " ".join(str(int(i)) for i in ids)


def _token_content(value) -> Optional[str]:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _tokenizer_from_json(path: str):
    """``tokenizers.Tokenizer.from_file``, with a one-line error naming a damaged file."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as err:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{path} is not a valid tokenizer.json ({err}): the file is damaged or truncated; "
                         f"restore it, or train a new one with tools/preprocess_data.py --train-tokenizer") from None


def load_hf_tokenizer(path: str, eod_token: Optional[str] = None) -> HFTokenizer:
    """Load a Hugging Face tokenizer offline from a tokenizer.json file or a directory.

    A directory with tokenizer.json is read with `tokenizers` directly (its tokenizer_config.json,
    if any, names the eos/pad tokens); any other directory (vocab.json + merges.txt, ...) goes
    through `transformers.AutoTokenizer(local_files_only=True)` (under
    `megatron_poet.safe_loading.restricted_loading`: nothing is unpickled) and must have a fast backend.

    Args:
        path: tokenizer.json file or tokenizer directory.
        eod_token: end-of-document token; default: the config's eos token, else a known one
            (`<|endoftext|>`, `</s>`, ...) found in the vocabulary.
    Raises ValueError naming a damaged tokenizer.json or tokenizer_config.json.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer not found: {path} (give a tokenizer.json file or a "
                                f"directory holding one, or train one with "
                                f"tools/preprocess_data.py --train-tokenizer VOCAB_SIZE)")
    config = {}
    if os.path.isdir(path):
        config_path = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_path):
            try:
                with open(config_path, encoding="utf-8") as f:
                    config = json.load(f)
            except (OSError, ValueError) as err:
                raise ValueError(f"{config_path} is not a valid JSON tokenizer config: {err}; restore it from "
                                 f"the tokenizer's source, or delete it to use tokenizer.json alone") from None
        json_path = os.path.join(path, "tokenizer.json")
        if os.path.isfile(json_path):
            backend = _tokenizer_from_json(json_path)
        else:
            from transformers import AutoTokenizer

            from megatron_poet.safe_loading import restricted_loading

            with restricted_loading(f"tokenizer {path}"):  # whatever files its tokenizer class reads
                hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
            backend = getattr(hf, "backend_tokenizer", None)
            if backend is None:
                raise ValueError(f"tokenizer {path} has no fast (Rust) backend; convert it to a "
                                 f"tokenizer.json with transformers first")
            config = {"eos_token": hf.eos_token, "pad_token": hf.pad_token}
    else:
        backend = _tokenizer_from_json(path)

    if eod_token is None:
        eos = _token_content(config.get("eos_token"))
        candidates = ((eos,) if eos else ()) + _KNOWN_EOD_TOKENS
        eod_token = next((t for t in candidates if backend.token_to_id(t) is not None), None)
        if eod_token is None:
            raise ValueError(f"tokenizer {path} has no end-of-document token (none of "
                             f"{list(_KNOWN_EOD_TOKENS)}, no eos_token in tokenizer_config.json); "
                             f"name one with eod_token=")
    pad_token = _token_content(config.get("pad_token"))
    # A pad equal to eod would make megatron mask real document ends; treat it as no pad.
    if pad_token == eod_token:
        pad_token = None
    return HFTokenizer(backend, eod_token, os.path.abspath(path), pad_token)


def build_tokenizer(tokenizer_type: str = "HuggingFaceTokenizer",
                    tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None):
    """Megatron-style `--tokenizer-type` dispatch.

    Args:
        tokenizer_type: "HuggingFaceTokenizer" (needs `tokenizer_model`, a tokenizer.json or a
            directory) or "NullTokenizer" (needs `vocab_size`; for --mock-data).
    Returns:
        HFTokenizer or NullTokenizer.
    """
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH "
                             "(a tokenizer.json file or a directory holding one)")
        return load_hf_tokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size N")
        return NullTokenizer(vocab_size)
    raise ValueError(f"unsupported --tokenizer-type {tokenizer_type!r}; supported: "
                     f"{', '.join(TOKENIZER_TYPES)}")


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, out_dir: str,
                         min_frequency: int = 2) -> str:
    """Train a GPT-2-style byte-level BPE on `texts` and save it loadable by Hugging Face.

    Byte-level pre-tokenization makes the tokenizer lossless (decode(encode(t)) == t for any
    UTF-8 text) and leaves no unknown tokens. Writes into `out_dir`: tokenizer.json,
    tokenizer_config.json and special_tokens_map.json, so that both `load_hf_tokenizer(out_dir)`
    and `transformers.AutoTokenizer.from_pretrained(out_dir)` load it. The only special token is
    `<|endoftext|>` (id 0), used as eos/bos/unk like GPT-2.

    Args:
        texts: the training documents (strings), streamed once.
        vocab_size: total vocabulary size, >= 257 (256 byte tokens + <|endoftext|>).
        out_dir: directory to write to (created).
        min_frequency: a pair must occur this often to be merged.
    Returns:
        out_dir.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"--train-tokenizer VOCAB_SIZE must be >= 257 (256 byte tokens + "
                         f"{EOD_TOKEN}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOD_TOKEN],
        # All 256 bytes up front, so text unseen in training still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)

    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    specials = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}
    # Written by hand rather than by transformers' save_pretrained: that writes a
    # version-specific tokenizer_class ("TokenizersBackend" in v5) older versions cannot load.
    # No clean-up of spaces on decode, or " ," would come back as "," and break the round trip.
    config = dict(specials, tokenizer_class="PreTrainedTokenizerFast",
                  clean_up_tokenization_spaces=False, add_bos_token=False, add_eos_token=False)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(specials, f, indent=2)
    return out_dir
