"""The DeepSpeed engine's checkpoints (any ZeRO stage): saved with DeepSpeed's own ``save_checkpoint``,
resumed at the same stage and data-parallel size, read by the exporter in one process.

``iter_XXXXXXX`` holds DeepSpeed's files (``mp_rank_00_model_states.pt``, the optimizer partitions,
ZeRO-3's parameter fragments) plus ``common.json``: the engine, ZeRO stage, model arguments,
iteration, consumed samples, merge scheduler and layout, as plain JSON. The LR schedule and every
rank's RNG states ride in DeepSpeed's ``client_state``. Nothing is unpickled with arbitrary globals:
every ``*.pt`` is examined first (:func:`check_files`) and read inside :func:`reading`.

For the export (:meth:`DeepSpeedFormat.load_model_weights`): ZeRO-1/2 keep the whole model state in
``mp_rank_00_model_states.pt``; ZeRO-3 partitions every parameter, ``A0`` included, and DeepSpeed's
``zero_to_fp32`` reassembles them. DeepSpeed has no asynchronous save here: ``--async-save`` is refused
with ``--deepspeed`` by the argument checks.
"""
from __future__ import annotations

import contextlib
import glob
import io
import json
import os

import torch

from megatron_poet.safe_loading import UnsafeFileError, check_torch_file, restricted_loading

from .base import CheckpointFormat
from .directory import CheckpointError, CheckpointReadError, checkpoint_dir, commit, prepare, saved_by_this_run
from .record import layout, recorded_args, rng_state, set_rng_state

COMMON_FILE = "common.json"
ENGINE = "deepspeed"
# Plain-data DeepSpeed classes its checkpoint files reference (beyond torch's weights-only allow-list).
DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.utils.tensor_fragment.fragment_address")


def read_common(path: str) -> dict:
    """The plain-data common state of a DeepSpeed-engine checkpoint directory."""
    try:
        with open(os.path.join(path, COMMON_FILE)) as f:
            common = json.load(f)
    except (OSError, ValueError) as err:
        raise CheckpointReadError(f"cannot read {os.path.join(path, COMMON_FILE)}: {err}") from None
    if not isinstance(common, dict) or common.get("engine") != ENGINE:
        raise CheckpointReadError(f"{os.path.join(path, COMMON_FILE)} is not a DeepSpeed-engine checkpoint's "
                                  f"common state")
    return common


def check_files(path: str) -> None:
    """Refuse (:class:`~megatron_poet.safe_loading.UnsafeFileError`) a checkpoint directory ``path`` whose
    ``*.pt`` files name anything but plain data, before any of them is loaded."""
    for name in sorted(glob.glob(os.path.join(path, "*.pt"))):
        check_torch_file(name, DEEPSPEED_GLOBALS)


def reading(path: str) -> contextlib.AbstractContextManager:
    """Within the block, DeepSpeed (or anything else) reads checkpoint ``path``'s files as plain data only."""
    return restricted_loading(f"DeepSpeed checkpoint {path}", DEEPSPEED_GLOBALS)


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


class DeepSpeedFormat(CheckpointFormat):
    """DeepSpeed's checkpoints (see the module docstring)."""

    name = "DeepSpeed"

    def owns(self, path: str) -> bool:
        return os.path.isfile(os.path.join(path, COMMON_FILE))

    def save(self, engine, iteration: int, consumed_samples: int) -> str:
        args = engine.args
        path = checkpoint_dir(args.save, iteration)
        if saved_by_this_run(path):
            return path  # e.g. a signal right after a periodic save
        prepare(args.save, path)
        rng_states = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(rng_states, rng_state(plain=True))
        client_state = {"lr_scheduler": engine.scheduler.state_dict(), "rng_states": rng_states}
        engine.engine.save_checkpoint(args.save, tag=os.path.basename(path), client_state=client_state,
                                      save_latest=False)
        if torch.distributed.get_rank() == 0:
            merges = engine.merge_scheduler
            _write_json(os.path.join(path, COMMON_FILE), {
                "engine": ENGINE, "zero_stage": engine.zero_stage, "args": recorded_args(args),
                "iteration": iteration, "consumed_samples": consumed_samples,
                "merge_scheduler": merges.state_dict() if merges else None, "layout": list(layout()[0]),
            })
        torch.distributed.barrier()  # every rank has written its part
        commit(args.save, path, iteration, args.keep_last_checkpoints)
        return path

    def load(self, engine, path: str) -> tuple[int, int]:
        args = engine.args
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
            set_rng_state(rng_states[torch.distributed.get_rank()])
        return int(common["iteration"]), int(common["consumed_samples"])

    def read_args(self, path: str) -> dict:
        return read_common(path).get("args")

    def zero_stage(self, path: str) -> int:
        """The ZeRO stage checkpoint ``path`` was saved at."""
        return read_common(path)["zero_stage"]

    def resume_args(self, args, path: str) -> dict:
        """Refuses (:class:`CheckpointError`) a checkpoint of another ZeRO stage or data-parallel size."""
        from megatron_poet.training.engine.deepspeed_config import deepspeed_config

        common = read_common(path)
        stage, dp = common["zero_stage"], common["layout"][2]
        ours = deepspeed_config(args)["zero_optimization"]["stage"]
        problems = []
        if ours != stage:
            problems.append(f"it was saved at ZeRO stage {stage}, this run uses stage {ours}")
        if dp != args.data_parallel_size:
            problems.append(f"it was saved at data-parallel size {dp}, this run has {args.data_parallel_size}")
        if problems:
            raise CheckpointError(f"--load {args.load} ({os.path.basename(os.path.normpath(path))}) cannot be resumed "
                                  f"by this run: " + "; ".join(problems)
                                  + "; DeepSpeed checkpoints resume at the same stage and size")
        check_files(path)
        return common["args"]

    def padded_vocab_size(self, path: str) -> int:
        return read_common(path).get("args")["padded_vocab_size"]  # trained at TP=1: its own padding

    def load_model_weights(self, model: torch.nn.Module, path: str) -> None:
        try:
            state = _read_model_state(path)
        except CheckpointReadError:
            raise
        except UnsafeFileError as err:
            raise CheckpointReadError(str(err)) from None
        except Exception as err:  # any failure here means an unreadable checkpoint
            raise CheckpointReadError(f"cannot read DeepSpeed checkpoint {path}: {type(err).__name__}: {err}") from err
        model.load_state_dict(state)


def _read_model_state(path: str) -> dict[str, torch.Tensor]:
    """The model state dict of DeepSpeed-engine checkpoint ``path`` (see the module docstring)."""
    from megatron_poet.training.engine.deepspeed import import_deepspeed

    try:
        import_deepspeed()
    except ImportError:
        raise CheckpointReadError('reading a DeepSpeed checkpoint needs deepspeed: pip install -e ".[deepspeed]"') \
            from None
    stage = read_common(path)["zero_stage"]
    check_files(path)
    with reading(path):
        if stage < 3:
            return torch.load(os.path.join(path, "mp_rank_00_model_states.pt"), map_location="cpu")["module"]
        from deepspeed.utils import zero_to_fp32

        with contextlib.redirect_stdout(io.StringIO()):  # it prints what it reassembled
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(os.path.normpath(path)),
                                                                         tag=os.path.basename(os.path.normpath(path)))
