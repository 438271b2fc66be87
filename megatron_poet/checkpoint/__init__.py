"""Checkpoints: one directory layout (:mod:`.directory`, :mod:`.manifest`), two formats behind one
interface (:class:`CheckpointFormat`: megatron ``dist_checkpointing`` and DeepSpeed), used by the
training engines (save, load, background saves) and by the exporter (read, verify) alike."""
from .base import CheckpointFormat
from .deepspeed_format import DeepSpeedFormat
from .directory import (
    MARKER, CheckpointError, CheckpointReadError, checkpoint_dir, latest_iteration, resolve, saved_by_this_run, write_marker,
)
from .dist_format import DistFormat
from .manifest import iterations, verify_or_explain
from .record import SHAPE_ARGS, recorded_args, saved_shape_args, shape_args

FORMATS: tuple[type[CheckpointFormat], ...] = (DistFormat, DeepSpeedFormat)


def format_of(path: str) -> CheckpointFormat | None:
    """A new instance of the format checkpoint directory ``path`` was written in (``None``: neither)."""
    return next((cls() for cls in FORMATS if cls().owns(path)), None)


def resolve_checkpoint(load: str, iteration: int | None = None) -> tuple[str, int | None]:
    """:func:`.directory.resolve` for checkpoints of any known format."""
    return resolve(load, iteration, lambda path: format_of(path) is not None)


__all__ = [
    "CheckpointError", "CheckpointFormat", "CheckpointReadError", "DeepSpeedFormat", "DistFormat", "FORMATS",
    "MARKER", "SHAPE_ARGS", "checkpoint_dir", "format_of", "iterations", "latest_iteration", "recorded_args",
    "resolve_checkpoint", "saved_by_this_run", "saved_shape_args", "shape_args", "verify_or_explain", "write_marker",
]
