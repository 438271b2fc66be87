"""Checkpoints of the DeepSpeed engine: DeepSpeed's own files in the program's layout, read safely.

Layout under ``--save``, as for the megatron engine::

    iter_0000100/                       DeepSpeed's save_checkpoint(tag="iter_0000100") + common.json
    latest_checkpointed_iteration.txt   moved atomically once every rank has written

Inside ``iter_XXXXXXX``: DeepSpeed's model-state file(s) (ZeRO-1/2: ``mp_rank_00_model_states.pt``
with the full model; ZeRO-3: one ``zero_pp_rank_R_mp_rank_00_model_states.pt`` per rank with its
partition of the frozen parameters, ``A0`` included), one ``*_optim_states.pt`` per rank (fp32
partitions and Adam state) and :data:`COMMON_FILE`, plain JSON: engine, ZeRO stage, the model
arguments, iteration, consumed samples (the data position), the merge scheduler and the layout.
DeepSpeed's client state carries the LR schedule and every rank's RNG states. POET permutations
are module buffers in the model state. A resumed run therefore continues bitwise like an
uninterrupted one on CPU, at the same ZeRO stage and data-parallel size.

Reading never unpickles arbitrary objects: the ``*.pt`` files are examined before any work
(:func:`check_files`) and DeepSpeed reads them inside :func:`reading`
(:func:`megatron_poet.safe_loading.restricted_loading`: weights-only ``torch.load`` plus the few
plain-data DeepSpeed classes the files reference, :data:`DEEPSPEED_GLOBALS`).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil

import numpy as np
import torch

from megatron_poet.safe_loading import check_torch_file, restricted_loading

from ..checkpointing import (
    CheckpointError, _layout, _rng_state, _set_rng_state, checkpoint_dir, commit_checkpoint, iteration_to_load,
    recorded_args, saved_by_this_run,
)
from .base import TrainingState
from .deepspeed_config import deepspeed_config

COMMON_FILE = "common.json"
ENGINE = "deepspeed"
# Plain-data DeepSpeed classes its checkpoint files reference (beyond torch's weights-only allow-list).
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")


def is_deepspeed_checkpoint(path: str) -> bool:
    """Whether the ``iter_XXXXXXX`` directory ``path`` was written by the DeepSpeed engine."""
    return os.path.isfile(os.path.join(path, COMMON_FILE))


def read_common(path: str) -> dict:
    """The plain-data common state of a DeepSpeed-engine checkpoint directory."""
    try:
        with open(os.path.join(path, COMMON_FILE)) as f:
            common = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {os.path.join(path, COMMON_FILE)}: {err}") from None
    if not isinstance(common, dict) or common.get("engine") != ENGINE:
        raise CheckpointError(f"{os.path.join(path, COMMON_FILE)} is not a DeepSpeed-engine checkpoint's common state")
    return common


def saved_args_for_resume(args, path: str) -> dict:
    """The model arguments of checkpoint ``path`` once it is known to suit this run's engine.

    Raises :class:`CheckpointError` when the engine, the ZeRO stage or the data-parallel size differ.
    """
    iteration = os.path.basename(os.path.normpath(path))
    if not is_deepspeed_checkpoint(path):
        raise CheckpointError(f"--load {args.load} ({iteration}) was written by the megatron engine; resume it "
                              f"without --deepspeed/--zero-stage, or export it with tools/convert_to_hf.py")
    common = read_common(path)
    stage, dp = common["zero_stage"], common["layout"][2]
    if not args.deepspeed:
        raise CheckpointError(f"--load {args.load} ({iteration}) was written by DeepSpeed ZeRO-{stage}; resume it "
                              f"with --zero-stage {stage} (or --deepspeed and a config of that stage)")
    ours = deepspeed_config(args)["zero_optimization"]["stage"]
    problems = []
    if ours != stage:
        problems.append(f"it was saved at ZeRO stage {stage}, this run uses stage {ours}")
    if dp != args.data_parallel_size:
        problems.append(f"it was saved at data-parallel size {dp}, this run has {args.data_parallel_size}")
    if problems:
        raise CheckpointError(f"--load {args.load} ({iteration}) cannot be resumed by this run: "
                              + "; ".join(problems) + "; DeepSpeed checkpoints resume at the same stage and size")
    check_files(path)
    return common["args"]


def check_files(path: str) -> None:
    """Refuse (:class:`~megatron_poet.safe_loading.UnsafeFileError`) a checkpoint directory ``path`` whose
    ``*.pt`` files name anything but plain data, before any of them is loaded."""
    for name in sorted(glob.glob(os.path.join(path, "*.pt"))):
        check_torch_file(name, DEEPSPEED_GLOBALS)


def reading(path: str) -> contextlib.AbstractContextManager:
    """Within the block, DeepSpeed (or anything else) reads checkpoint ``path``'s files as plain data only."""
    return restricted_loading(f"DeepSpeed checkpoint {path}", DEEPSPEED_GLOBALS)


def _plain_rng_state() -> dict:
    """This rank's RNG states with numpy's as plain numbers (loadable with ``weights_only=True``)."""
    state = _rng_state()
    name, keys, pos, has_gauss, cached = state["numpy"]
    state["numpy"] = (name, keys.tolist(), pos, has_gauss, cached)
    return state


def _restore_rng(state: dict) -> None:
    name, keys, pos, has_gauss, cached = state["numpy"]
    _set_rng_state({**state, "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)})


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def save(engine, state: TrainingState) -> str:
    """Save ``state`` of the :class:`~.deepspeed.DeepSpeedEngine` ``engine`` under ``--save`` (all ranks call)."""
    args = engine.args
    rank = torch.distributed.get_rank()
    path = checkpoint_dir(args.save, state.iteration)
    if saved_by_this_run(path):
        return path  # e.g. a signal right after a periodic save
    if rank == 0:
        os.makedirs(args.save, exist_ok=True)
        if os.path.exists(path):  # left by a killed save (not marked) or an earlier run
            shutil.rmtree(path)
    torch.distributed.barrier()
    rng_states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rng_states, _plain_rng_state())
    client_state = {"lr_scheduler": engine.scheduler.state_dict(), "rng_states": rng_states}
    engine.engine.save_checkpoint(args.save, tag=os.path.basename(path), client_state=client_state,
                                  save_latest=False)
    if rank == 0:
        sizes, _ = _layout()
        merges = engine.merge_scheduler
        _write_json(os.path.join(path, COMMON_FILE), {
            "engine": ENGINE, "zero_stage": engine.zero_stage, "args": recorded_args(args),
            "iteration": state.iteration, "consumed_samples": state.consumed_samples,
            "merge_scheduler": merges.state_dict() if merges else None, "layout": list(sizes),
        })
    torch.distributed.barrier()  # every rank has written its part
    commit_checkpoint(args, path, state.iteration)
    return path


def load(engine) -> TrainingState:
    """Restore the newest checkpoint under ``--load`` into ``engine`` (``TrainingState()`` when there is none).

    Call :func:`megatron_poet.training.checkpointing.check_checkpoint_args` first.
    """
    args = engine.args
    iteration = iteration_to_load(args)
    if iteration is None:
        return TrainingState()
    path = checkpoint_dir(args.load, iteration)
    common = read_common(path)
    with reading(path):
        loaded, client_state = engine.engine.load_checkpoint(args.load, tag=os.path.basename(path),
                                                             load_lr_scheduler_states=False)
    if loaded is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {path}")
    engine.scheduler.load_state_dict(client_state["lr_scheduler"])
    if engine.merge_scheduler is not None:
        engine.merge_scheduler.load_state_dict(common["merge_scheduler"])
    rng_states = client_state["rng_states"]
    if len(rng_states) == torch.distributed.get_world_size():
        _restore_rng(rng_states[torch.distributed.get_rank()])
    return TrainingState(int(common["iteration"]), int(common["consumed_samples"]))
