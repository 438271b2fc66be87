"""Data pipeline: preprocessing round trip, megatron-core datasets, resume, clear input errors."""
import itertools
import json
import os
import re
import shutil
import warnings

import numpy
import pytest
import torch

warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402

from megatron_poet.data import (  # noqa: E402
    DataError, InputError, NullTokenizer, build_pretraining_data_loader, build_tokenizer,
    build_train_valid_test_datasets, check_indexed_dataset, load_hf_tokenizer, parse_data_path,
    prepare_default_data, preprocess_corpus, train_byte_level_bpe)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "data", "tinyshakespeare.txt")
needs_corpus = pytest.mark.skipif(not os.path.isfile(SHAKESPEARE),
                                  reason=f"test corpus {SHAKESPEARE} not present")


def paragraphs(text):
    """Independent reference for the text format: blank-line-separated paragraphs."""
    return [p for p in re.split(r"\n(?:[ \t]*\n)+", text.strip("\n")) if p.strip()]


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """tinyshakespeare preprocessed with a byte-level BPE trained on it: (prefix, tokenizer)."""
    out = tmp_path_factory.mktemp("shakespeare")
    stats = preprocess_corpus(SHAKESPEARE, str(out / "shak"), train_tokenizer_vocab_size=600,
                              progress=False)
    return str(out / "shak"), stats.tokenizer_path


def copy_data(prefix, dest_dir):
    """Copy a .bin/.idx pair so a test can damage it; returns the new prefix."""
    os.makedirs(dest_dir, exist_ok=True)
    new = os.path.join(dest_dir, "copy")
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, new + ext)
    return new


@needs_corpus
def test_preprocess_round_trip(shakespeare):
    prefix, tok_path = shakespeare
    tok = load_hf_tokenizer(tok_path)
    with open(SHAKESPEARE, encoding="utf-8") as f:
        expected = paragraphs(f.read())
    ds = IndexedDataset(prefix)
    assert len(ds) == len(expected) == len(ds.document_indices) - 1
    decoded = [tok.detokenize(ds[i]) for i in range(len(ds))]
    assert decoded == expected


@needs_corpus
def test_trained_tokenizer_loads_in_transformers(shakespeare):
    from transformers import AutoTokenizer

    _, tok_path = shakespeare
    ours = load_hf_tokenizer(tok_path)
    hf = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    text = "First Citizen:\nBefore we proceed , any further, hear me speak. \u00e9\u4e16"
    assert hf(text, add_special_tokens=False)["input_ids"] == ours.tokenize(text)
    assert hf.eos_token_id == ours.eod == ours.vocab["<|endoftext|>"]
    assert hf.decode(ours.tokenize(text)) == text


@needs_corpus
def test_gpt2_style_directory_loads_through_transformers(shakespeare, tmp_path):
    """A directory with vocab.json + merges.txt (no tokenizer.json) takes the AutoTokenizer path."""
    from tokenizers import Tokenizer

    _, tok_path = shakespeare
    backend = Tokenizer.from_file(os.path.join(tok_path, "tokenizer.json"))
    backend.model.save(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>"}))
    tok = load_hf_tokenizer(str(tmp_path))
    text = "Hello there,\n\nfriend  x"
    assert tok.tokenize(text) == backend.encode(text).ids
    assert tok.detokenize(tok.tokenize(text)) == text
    assert (tok.vocab_size, tok.eod) == (600, 0)


@needs_corpus
def test_jsonl_with_eod_and_workers(shakespeare, tmp_path):
    _, tok_path = shakespeare
    tok = load_hf_tokenizer(tok_path)
    texts = ["Hello world.", "", "Zwei\nZeilen \u00fcber \u00e4pfel", "  spaced  ", "last"]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(texts))
                    + "\n\n", encoding="utf-8")
    one = preprocess_corpus(str(path), str(tmp_path / "one"), tokenizer=tok_path,
                            json_key="body", append_eod=True, progress=False, chunk_size=2)
    two = preprocess_corpus(str(path), str(tmp_path / "two"), tokenizer=tok_path,
                            json_key="body", append_eod=True, progress=False, chunk_size=2,
                            workers=2)
    assert (one.documents, one.skipped_empty) == (4, 1)
    ds = IndexedDataset(str(tmp_path / "one"))
    assert [tok.detokenize(ds[i][:-1]) for i in range(len(ds))] == [t for t in texts if t]
    assert all(ds[i][-1] == tok.eod for i in range(len(ds)))
    assert one.tokens == int(ds.sequence_lengths.sum())
    with open(one.bin_path, "rb") as a, open(two.bin_path, "rb") as b:
        assert a.read() == b.read()


@needs_corpus
def test_cli(shakespeare, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "preprocess_data", os.path.join(ROOT, "tools", "preprocess_data.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    main = cli.main

    src = tmp_path / "in.txt"
    src.write_text("para one\nline two\n\n\n  \npara two\n", encoding="utf-8")
    assert main(["--input", str(src), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer", shakespeare[1], "--append-eod", "--no-progress"]) == 0
    assert "wrote 2 documents" in capsys.readouterr().out
    assert main(["--input", str(tmp_path / "nope.txt"), "--output-prefix", str(tmp_path / "p"),
                 "--train-tokenizer", "300", "--no-progress"]) == 1
    assert "input file not found" in capsys.readouterr().err


def test_tokenizer_training_shows_progress(tmp_path, capfd):
    """A bar while the trainer reads the corpus, a line while it computes the merges, one when done."""
    from megatron_poet.data.default_corpus import generate_corpus

    src = tmp_path / "corpus.txt"
    src.write_text("\n\n".join(generate_corpus(200)), encoding="utf-8")
    preprocess_corpus(str(src), str(tmp_path / "c"), train_tokenizer_vocab_size=300, progress=True)
    err = capfd.readouterr().err
    reading, merges, done = (err.index(s) for s in ("training tokenizer: reading", "computing the merges of a "
                                                    "300-token vocabulary", "training tokenizer: done"))
    assert reading < merges < done < err.index("tokenizing")
    assert "100%" in err[reading:merges]


def test_input_errors(tmp_path):
    tok_dir = tmp_path / "tok"
    src = tmp_path / "ok.txt"
    src.write_text("some text\n", encoding="utf-8")
    preprocess_corpus(str(src), str(tmp_path / "ok"), train_tokenizer_vocab_size=300,
                      progress=False)
    tok_path = str(tmp_path / "ok_tokenizer")
    with pytest.raises(InputError, match="input file not found: .*missing.txt"):
        preprocess_corpus(str(tmp_path / "missing.txt"), str(tmp_path / "x"), tokenizer=tok_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"bad.jsonl:2: invalid JSON"):
        preprocess_corpus(str(bad), str(tmp_path / "x"), tokenizer=tok_path, progress=False)
    nokey = tmp_path / "nokey.jsonl"
    nokey.write_text('{"text": "a"}\n\n{"content": "b"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"nokey.jsonl:3: no key 'text' \(found \['content'\]\)"
                                         r".*--json-key"):
        preprocess_corpus(str(nokey), str(tmp_path / "x"), tokenizer=tok_path, progress=False)
    # The key error also surfaces while training a tokenizer on the input.
    with pytest.raises(InputError, match="nokey.jsonl:3: no key 'text'"):
        preprocess_corpus(str(nokey), str(tmp_path / "y"), train_tokenizer_vocab_size=300,
                          progress=False)
    # A failed run leaves no partial output behind.
    assert not [p for p in os.listdir(tmp_path) if p.startswith(("x.", "y."))]
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        load_hf_tokenizer(str(tok_dir / "nothing.json"))


@needs_corpus
def test_gpt_dataset_samples_come_from_data(shakespeare, tmp_path):
    prefix, tok_path = shakespeare
    tok = load_hf_tokenizer(tok_path)
    seq = 32
    train, valid, test = build_train_valid_test_datasets(
        tok, seq, [200, 40, 0], data_path=prefix, split="90,10,0", seed=7,
        path_to_cache=str(tmp_path / "cache"))
    assert test is None
    docs = IndexedDataset(prefix)
    n_train = int(round(0.9 * len(docs)))
    for ds, lo, hi in ((train, 0, n_train), (valid, n_train, len(docs))):
        assert len(ds) >= (200 if ds is train else 40)
        assert ds.document_index.min() >= lo and ds.document_index.max() < hi
        # Reference: the token stream of the documents in the dataset's document order.
        stream = numpy.concatenate([docs[d] for d in ds.document_index])
        starts = numpy.concatenate([[0], numpy.cumsum(docs.sequence_lengths[ds.document_index])])
        for i in range(0, len(ds), max(1, len(ds) // 25)):
            sample = ds[i]
            assert sample["tokens"].shape == sample["labels"].shape == (seq,)
            assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
            doc_pos, offset = ds.sample_index[ds.shuffle_index[i]]
            begin = starts[doc_pos] + offset
            expected = torch.from_numpy(stream[begin:begin + seq + 1].astype(numpy.int64))
            assert torch.equal(torch.cat([sample["tokens"], sample["labels"][-1:]]), expected)


@needs_corpus
def test_blended_weights(shakespeare, tmp_path):
    prefix, tok_path = shakespeare
    tok = load_hf_tokenizer(tok_path)
    other = copy_data(prefix, tmp_path)
    assert parse_data_path(f"0.25 {prefix} 0.75 {other}") == ([prefix, other], [0.25, 0.75])
    assert parse_data_path([prefix, other]) == ([prefix, other], None)
    with pytest.raises(DataError, match="weight/prefix pairs"):
        parse_data_path(f"0.25 {prefix} {other}")
    train, _, _ = build_train_valid_test_datasets(
        tok, 16, [400, 20, 0], data_path=f"0.25 {prefix} 0.75 {other}", split="95,5,0",
        path_to_cache=str(tmp_path / "cache"))
    assert len(train) == 400
    assert not torch.distributed.is_initialized()  # the temporary build group is gone
    share = numpy.bincount(train.dataset_index, minlength=2) / len(train)
    # megatron blends deterministically (greedy on the error), so shares match to 1/size.
    assert numpy.allclose(share, [0.25, 0.75], atol=2 / len(train))
    with pytest.raises(DataError, match="sample count for every split"):
        build_train_valid_test_datasets(tok, 16, [400, None, 0],
                                        data_path=f"0.25 {prefix} 0.75 {other}", split="95,5,0")


@needs_corpus
def test_resume_sampler_gives_exact_continuation(shakespeare, tmp_path):
    prefix, tok_path = shakespeare
    train, _, _ = build_train_valid_test_datasets(
        load_hf_tokenizer(tok_path), 16, [64, 8, 0], data_path=prefix, split="90,10,0",
        path_to_cache=str(tmp_path / "cache"))
    mbs, dp, done, steps = 2, 2, 3, 12  # resume after 3 steps of 2 ranks x 2 samples

    def batches(consumed, rank, n):
        loader = build_pretraining_data_loader(train, consumed, mbs, rank, dp)
        return len(loader), [b["tokens"] for b in itertools.islice(loader, n)]

    for r in range(dp):
        n_full, full = batches(0, r, done + steps)
        n_resumed, resumed = batches(done * mbs * dp, r, steps)
        assert n_resumed == n_full - done == (len(train) // (mbs * dp)) - done
        assert all(torch.equal(a, b) for a, b in zip(full[done:], resumed))
        # Rank r's step-k micro-batch is its slice of global batch k, read in dataset order.
        expected = torch.stack([train[done * mbs * dp + r * mbs + i]["tokens"]
                                for i in range(mbs)])
        assert torch.equal(resumed[0], expected)
    with pytest.raises(ValueError, match="cannot resume"):
        build_pretraining_data_loader(train, len(train) + 1, mbs)


@needs_corpus
def test_bad_data_errors(shakespeare, tmp_path):
    prefix, tok_path = shakespeare
    tok = load_hf_tokenizer(tok_path)

    def build(data_path, tokenizer=tok):
        return build_train_valid_test_datasets(tokenizer, 16, [8, 2, 0], data_path=data_path,
                                               split="90,10,0")

    missing_bin = copy_data(prefix, tmp_path / "a")
    os.remove(missing_bin + ".bin")
    with pytest.raises(DataError, match=r"copy\.bin is missing \(.*copy\.idx exists\).*"
                                        r"preprocess_data"):
        build(missing_bin)
    missing_idx = copy_data(prefix, tmp_path / "b")
    os.remove(missing_idx + ".idx")
    with pytest.raises(DataError, match=r"copy\.idx is missing"):
        build(missing_idx)
    with pytest.raises(DataError, match="neither .* nor .* exists.*without the extension"):
        build(prefix + ".bin")

    bad_header = copy_data(prefix, tmp_path / "c")
    with open(bad_header + ".idx", "r+b") as f:
        f.write(b"GARBAGE!!")
    with pytest.raises(DataError, match=r"corrupt index .*copy\.idx.*re-run "
                                        r"tools/preprocess_data.py"):
        build(bad_header)
    truncated = copy_data(prefix, tmp_path / "d")
    with open(truncated + ".idx", "r+b") as f:
        f.truncate(os.path.getsize(truncated + ".idx") - 8)
    with pytest.raises(DataError, match=r"corrupt index .*truncated"):
        build(truncated)
    short_bin = copy_data(prefix, tmp_path / "e")
    with open(short_bin + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(short_bin + ".bin") - 2)
    with pytest.raises(DataError, match=r"copy\.bin has .* bytes but .*copy\.idx describes"):
        build(short_bin)

    # A tokenizer with fewer ids than the data uses (300 < the 600 the data was made with).
    small_path = train_byte_level_bpe(["a tiny corpus"] * 3, 300, str(tmp_path / "small_tok"))
    max_id = check_indexed_dataset(prefix).max_token_id
    assert max_id >= 300
    with pytest.raises(DataError, match=rf"shak\.bin holds token id {max_id} but tokenizer "
                                        rf"\S*small_tok has only \d+ ids"):
        build(prefix, load_hf_tokenizer(small_path))
    with pytest.raises(DataError, match="tokenizer NullTokenizer has only 101 ids"):
        build(prefix, NullTokenizer(100))
    # A different tokenizer whose vocabulary is large enough: caught by PREFIX.meta.json.
    from tokenizers import Tokenizer

    other = Tokenizer.from_file(os.path.join(tok_path, "tokenizer.json"))
    other.add_tokens(["<|extra|>"])
    os.makedirs(tmp_path / "other_tok")
    other.save(str(tmp_path / "other_tok" / "tokenizer.json"))
    with pytest.raises(DataError, match=r"shak was tokenized with \S*shak_tokenizer \(600 ids\) "
                                        r"but training uses tokenizer \S*other_tok \(601 ids\)"):
        build(prefix, load_hf_tokenizer(str(tmp_path / "other_tok")))

    with pytest.raises(DataError, match="gives the test split 0 of the"):
        build_train_valid_test_datasets(tok, 16, [8, 2, 1], data_path=prefix,
                                        split="99999,0,1")


def test_build_tokenizer_types():
    null = build_tokenizer("NullTokenizer", vocab_size=50)
    assert (null.vocab_size, null.eod) == (51, 50)
    assert null.tokenize(null.detokenize([3, 1, 4])) == [3, 1, 4]
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer")
    with pytest.raises(ValueError, match="supported: HuggingFaceTokenizer, NullTokenizer"):
        build_tokenizer("SentencePieceTokenizer", "x.model")


def test_mock_data():
    train, valid, test = build_train_valid_test_datasets(NullTokenizer(50), 16, [10, 4, 4],
                                                         mock=True)
    batch = next(iter(build_pretraining_data_loader(train, 0, 4)))
    assert batch["tokens"].shape == (4, 16) and int(batch["tokens"].max()) <= 50
    with pytest.raises(DataError, match="exactly one of --data-path and --mock-data"):
        build_train_valid_test_datasets(NullTokenizer(50), 16, [10, 4, 4])


def test_default_data(tmp_path):
    prefix, tok_path = prepare_default_data(str(tmp_path), num_documents=300)
    assert prepare_default_data(str(tmp_path), num_documents=300) == (prefix, tok_path)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".building")] == []
    tok = load_hf_tokenizer(tok_path)
    summary = check_indexed_dataset(prefix, tok.vocab_size)
    assert summary.documents == 300
    ds = IndexedDataset(prefix)
    assert all(ds[i][-1] == tok.eod for i in range(len(ds)))
    train, valid, _ = build_train_valid_test_datasets(tok, 32, [20, 5, 0], data_path=prefix,
                                                      split="90,10,0",
                                                      path_to_cache=str(tmp_path / "cache"))
    assert len(train) >= 20 and len(valid) >= 5
