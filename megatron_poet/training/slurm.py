"""Started by SLURM's ``srun``: rank, world and rendezvous from SLURM's variables, as torchrun would set them.

``srun python -m megatron_poet.training.pretrain ...`` (one task per GPU) gives every process
``SLURM_PROCID`` (global rank), ``SLURM_NTASKS`` (world size), ``SLURM_LOCALID`` (rank on its node)
and ``SLURM_NODELIST`` (the job's hosts, compressed: ``gpu[01-04,07]``). :func:`torchrun_env_from_slurm`
turns them into ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and ``MASTER_ADDR`` (the
first host), with ``MASTER_PORT`` from the environment or :data:`DEFAULT_PORT`. Under torchrun (``RANK``
already set) nothing changes. Half-set variables are refused before any work.
"""
from __future__ import annotations

import os
import re

DEFAULT_PORT = "29500"  # torchrun's default; set MASTER_PORT to run two jobs on one node
REQUIRED = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODELIST")


class SlurmEnvError(RuntimeError):
    """SLURM's variables are inconsistent; the message says which to set."""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[07-09,12],cpu1" -> "gpu07"``, ``"node3" -> "node3"``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise SlurmEnvError(f"SLURM_NODELIST={nodelist!r} is not a SLURM node list")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]  # zero padding is kept: it is part of the name


def torchrun_env_from_slurm(environ: dict[str, str]) -> dict[str, str]:
    """The torchrun variables a SLURM task needs (``{}`` outside SLURM or under torchrun).

    Raises :class:`SlurmEnvError` when only some of :data:`REQUIRED` are set, or they disagree.
    """
    if "RANK" in environ or "SLURM_PROCID" not in environ:
        return {}
    missing = [name for name in REQUIRED if not environ.get(name)]
    if missing:
        raise SlurmEnvError(f"started by SLURM (SLURM_PROCID is set) but {', '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not: launch with srun (one task per GPU), "
                            f"or with torchrun / megatron_poet.launch, which set RANK themselves")
    values = {name: environ[name] for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")}
    if not all(v.isdigit() for v in values.values()):
        raise SlurmEnvError(f"SLURM's task variables must be numbers: {values}")
    rank, world, local = (int(v) for v in values.values())
    if not 0 <= rank < world:
        raise SlurmEnvError(f"SLURM_PROCID={rank} is not below SLURM_NTASKS={world}")
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
           "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(environ["SLURM_NODELIST"]),
           "MASTER_PORT": environ.get("MASTER_PORT") or DEFAULT_PORT}
    per_node = environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    if per_node.isdigit():
        env["LOCAL_WORLD_SIZE"] = per_node
    return env


def adopt_slurm_env() -> None:
    """Set the torchrun variables from SLURM's in this process (see the module docstring)."""
    os.environ.update(torchrun_env_from_slurm(dict(os.environ)))
