"""No file the program reads back can run code: one malicious file per file type, in process (seconds).

Every malicious file holds a pickle that would create a marker file when unpickled; each test first
shows that an unrestricted load of it really does (so the test can fail), then that the program's
own reading refuses it with a message naming the file, and that the marker is not there. Normal
checkpoints of every layout still load: the resume and export tests of test_training.py (TP=2,
DP=2 with the distributed optimizer), test_deepspeed.py (ZeRO-1/2/3) and test_export_checkpoint.py
read them through the same restricted loaders.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

from test_training import TINY

DIST_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}


class Exploit:
    """Pickles to a call of ``os.system``: unpickling it would create ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.fixture
def marker(tmp_path):
    """``(path, check)``: where the exploit writes, and a function that asserts it ran and removes the file."""
    path = tmp_path / "pwned"

    def ran() -> bool:
        found = path.exists()
        path.unlink(missing_ok=True)
        return found

    return path, ran


def _dist_checkpoint(directory, marker_path, *, bad_common: bool = False, bad_index: bool = False,
                     bad_object: bool = False) -> str:
    """A torch_dist checkpoint directory (``metadata.json``, ``common.pt``, ``.metadata``, ``*.distcp``)
    whose chosen part is malicious."""
    import torch.distributed.checkpoint as dcp

    directory.mkdir(parents=True)
    (directory / "metadata.json").write_text(json.dumps(DIST_METADATA))
    rng = np.random.RandomState(0).get_state()  # a tuple holding an array, as in the program's RNG state
    dcp.save({"weight": torch.ones(4), "rng_state": Exploit(marker_path) if bad_object else rng},
             storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True)
    torch.save({"args": Exploit(marker_path) if bad_common else {"hidden_size": 64}}, directory / "common.pt")
    if bad_index:
        with open(directory / ".metadata", "wb") as f:
            pickle.dump(Exploit(marker_path), f)
    return str(directory)


def _load_rng(path: str):
    import torch.distributed.checkpoint as dcp

    state = {"rng_state": io.BytesIO()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    return state["rng_state"]


def test_a_normal_checkpoint_loads(tmp_path, marker):
    from megatron.core import dist_checkpointing

    from megatron_poet.safe_loading import check_dist_checkpoint, restricted_loading

    path = _dist_checkpoint(tmp_path / "ckpt", marker[0])
    check_dist_checkpoint(path)
    with restricted_loading("a test checkpoint"):
        assert dist_checkpointing.load_common_state_dict(path) == {"args": {"hidden_size": 64}}
        rng = _load_rng(path)
    assert np.array_equal(rng[1], np.random.RandomState(0).get_state()[1])


def test_common_pt(data, tmp_path, marker):
    """megatron's common.pt (torch.load): refused before any work by the --load check, and at load time."""
    from megatron.core import dist_checkpointing

    from megatron_poet.safe_loading import UnsafeFileError, restricted_loading
    from megatron_poet.training.arguments import parse_args
    from megatron_poet.checkpoint import CheckpointError, write_marker
    from megatron_poet.training.checkpointing import check_checkpoint_args

    path, ran = marker
    ckpt = _dist_checkpoint(tmp_path / "run" / "iter_0000001", path, bad_common=True)
    torch.load(os.path.join(ckpt, "common.pt"), weights_only=False)
    assert ran()  # the file is really malicious
    write_marker(str(tmp_path / "run"), 1)
    args = parse_args(data + TINY + ["--load", str(tmp_path / "run")], world_size=1)
    with pytest.raises(CheckpointError, match=r"refusing to load .*common\.pt: it references posix\.system"):
        check_checkpoint_args(args)
    with pytest.raises(UnsafeFileError, match=r"common\.pt \(checkpoint .*\): it references posix\.system"):
        with restricted_loading(f"checkpoint {ckpt}"):
            dist_checkpointing.load_common_state_dict(ckpt)
    assert not ran()


def test_dcp_metadata_index(tmp_path, marker):
    """The tensor index torch.distributed.checkpoint writes with pickle.dump."""
    from megatron.core import dist_checkpointing

    from megatron_poet.safe_loading import UnsafeFileError, check_dist_checkpoint, restricted_loading

    path, ran = marker
    ckpt = _dist_checkpoint(tmp_path / "ckpt", path, bad_index=True)
    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        pickle.load(f)
    assert ran()
    with pytest.raises(UnsafeFileError, match=r"\.metadata: it references posix\.system, which is not checkpoint"):
        check_dist_checkpoint(ckpt)
    with pytest.raises(UnsafeFileError, match=r"\.metadata \(checkpoint .*\): it references posix\.system"):
        with restricted_loading(f"checkpoint {ckpt}"):
            dist_checkpointing.load_tensors_metadata(ckpt)
    assert not ran()


def test_object_in_a_distcp_file(tmp_path, marker):
    """Objects stored in *.distcp files (RNG states, distributed-optimizer shards), which torch reads with
    torch.load(weights_only=False)."""
    from megatron_poet.safe_loading import UnsafeFileError, check_dist_checkpoint, restricted_loading

    path, ran = marker
    ckpt = _dist_checkpoint(tmp_path / "ckpt", path, bad_object=True)
    _load_rng(ckpt)
    assert ran()
    check_dist_checkpoint(ckpt)  # the small files are fine: the object is only seen as it loads
    with pytest.raises(UnsafeFileError, match=r"an object stored in checkpoint .*: it references posix\.system"):
        with restricted_loading(f"checkpoint {ckpt}"):
            _load_rng(ckpt)
    assert not ran()


def test_other_dist_checkpoint_backends_are_refused(tmp_path, marker):
    from megatron_poet.safe_loading import UnsafeFileError, check_dist_checkpoint

    ckpt = _dist_checkpoint(tmp_path / "ckpt", marker[0])
    metadata = tmp_path / "ckpt" / "metadata.json"
    for key, value in (("common_backend", "zarr"), ("sharded_backend", "zarr"), ("sharded_backend", None)):
        metadata.write_text(json.dumps({k: v for k, v in {**DIST_METADATA, key: value}.items() if v is not None}))
        with pytest.raises(UnsafeFileError, match=f"{key} must be '{DIST_METADATA[key]}'"):
            check_dist_checkpoint(ckpt)
    # megatron-core >= 0.17 writes no common_backend (common.pt is always torch's): accepted
    metadata.write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1}))
    check_dist_checkpoint(ckpt)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason='deepspeed not installed (".[deepspeed]")')
@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_deepspeed_files(tmp_path, marker, name):
    from megatron_poet.checkpoint import CheckpointReadError, DeepSpeedFormat
    from megatron_poet.checkpoint.deepspeed_format import COMMON_FILE, ENGINE, check_files, reading
    from megatron_poet.safe_loading import UnsafeFileError
    from megatron_poet.training.engine.deepspeed import import_deepspeed

    import_deepspeed()
    path, ran = marker
    ckpt = tmp_path / "iter_0000001"
    ckpt.mkdir()
    (ckpt / COMMON_FILE).write_text(json.dumps({"engine": ENGINE, "zero_stage": 1}))
    torch.save({"module": {"w": torch.ones(2)}}, ckpt / "mp_rank_00_model_states.pt")
    torch.save({"module": Exploit(path)}, ckpt / name)
    torch.load(ckpt / name, weights_only=False)
    assert ran()
    with pytest.raises(UnsafeFileError, match=rf"refusing to load .*{name}: it references posix\.system"):
        check_files(str(ckpt))  # before any work (the --load check, the export)
    with pytest.raises(UnsafeFileError, match=rf"{name} \(DeepSpeed checkpoint .*\): it references posix\.system"):
        with reading(str(ckpt)):  # what DeepSpeed's own loads run under
            torch.load(ckpt / name, map_location="cpu", weights_only=False)
    with pytest.raises(CheckpointReadError, match=rf"refusing to load .*{name}"):
        DeepSpeedFormat().load_model_weights(torch.nn.Linear(1, 1), str(ckpt))
    assert not ran()


@pytest.mark.parametrize("kind", ["pickle", "object array"])
def test_dataset_index_cache(tmp_path, marker, kind):
    """megatron-core's index caches (*.npy), which it reads with numpy.load(allow_pickle=True)."""
    from megatron_poet.safe_loading import UnsafeFileError, restricted_loading

    path, ran = marker
    npy = tmp_path / "index-shuffle_index.npy"
    if kind == "pickle":
        with open(npy, "wb") as f:
            pickle.dump(Exploit(path), f)
    else:
        np.save(npy, np.array([Exploit(path)], dtype=object), allow_pickle=True)
    np.load(npy, allow_pickle=True)
    assert ran()
    with pytest.raises(UnsafeFileError, match=r"index-shuffle_index\.npy .*: it holds pickled Python objects"):
        with restricted_loading("the dataset index cache"):
            np.load(npy, allow_pickle=True, mmap_mode="r")
    assert not ran()


def test_swapped_index_cache_stops_the_dataset_build(data, tmp_path, marker):
    """End to end: the datasets are built once (the cache is written), a cached index is swapped for a
    pickle, and the next build refuses it with a DataError instead of running it."""
    from megatron_poet.data import DataError, build_tokenizer, build_train_valid_test_datasets

    path, ran = marker
    prefix, tokenizer_path = data[data.index("--data-path") + 1], data[data.index("--tokenizer-model") + 1]
    tokenizer = build_tokenizer("HuggingFaceTokenizer", tokenizer_path)
    cache = tmp_path / "cache"

    def build():
        return build_train_valid_test_datasets(tokenizer, 32, (64, 8, 8), data_path=[prefix], split="969,30,1",
                                               path_to_cache=str(cache), create_attention_mask=False)

    build()
    (index,) = [f for f in os.listdir(cache) if f.endswith("shuffle_index.npy") and "train" in f]
    with open(cache / index, "wb") as f:
        pickle.dump(Exploit(path), f)
    with pytest.raises(DataError, match=rf"refusing to load .*{index}.*pickled Python objects.*Delete that file"):
        build()
    assert not ran()
