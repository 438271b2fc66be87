"""Launcher of the pretraining program: the ranks of this node, started and supervised.

The example scripts end in :func:`run_script` (``bash examples/pretrain_gpt_poet.sh``);
``python -m megatron_poet.launch [flags]`` launches the program with its own defaults.
Environment, as torchrun's flags:

  GPUS_PER_NODE   ranks on this node (default: the number of GPUs; 1 without GPUs)
  NNODES          nodes (default 1); with several, set NODE_RANK and MASTER_ADDR on every node
  MASTER_PORT     rendezvous port (default: a free port on one node, 29500 on several)

Ranks get torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT``; rank 0 hosts the rendezvous store), so torchrun
runs the same program. This launcher exists for what torchrun's agent does not do
and a first run on a shared machine needs:

- a free rendezvous port on one node (torchrun's 29500 makes a second run fail
  with EADDRINUSE);
- errors read once: the program reports bad input on rank 0 and exits 2, and the
  launcher adds nothing (torchrun adds a ~40-line ChildFailedError block); a crash
  gets one line naming the rank;
- clean stops: on Ctrl-C or SIGTERM every rank finishes its iteration and saves,
  for as long as the save takes (torchrun's agent kills after 30 s); a second
  signal kills at once; one line says how the run ended;
- nothing left behind: each rank runs in its own process group, killed when the
  rank exits (stray children with it), and ranks die with the launcher
  (:mod:`megatron_poet.training.process`).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

PROGRAM = "megatron_poet.training.pretrain"
REPORTED_ERROR = 2  # the program's exit code for bad input it has printed (on rank 0)
DIVERGED = 3  # ... for a diverged run it has stopped and reported (training/finite.py: EXIT_DIVERGED)
FAILURE_GRACE_S = 5.0  # after a rank fails, the others' collectives fail too: time to exit on their own
STOP_GRACE_S = 120.0  # after a signal, once one rank has exited (saved), the time the others get
DEFAULT_MULTI_NODE_PORT = 29500
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class LaunchError(ValueError):
    """An environment the launch cannot work with; the message names the variable to set."""


@dataclass(frozen=True)
class Topology:
    """Where this node's ranks sit in the job."""

    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


def _env_int(env, name: str, default: int | None) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"{name}={text!r} is not an integer") from None


def _gpus() -> int:
    import torch

    return torch.cuda.device_count()


def free_port() -> int:
    """A TCP port no process listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def topology_from_env(env=None, gpus_per_node: int | None = None, nnodes: int = 1) -> Topology:
    """This node's :class:`Topology` from ``GPUS_PER_NODE``, ``NNODES``, ``NODE_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``; the keyword arguments are the defaults of unset variables."""
    env = os.environ if env is None else env
    nproc = _env_int(env, "GPUS_PER_NODE", gpus_per_node) or max(_gpus(), 1)
    nodes = _env_int(env, "NNODES", nnodes)
    if nproc < 1 or nodes < 1:
        raise LaunchError(f"GPUS_PER_NODE={nproc} and NNODES={nodes} must be >= 1")
    if nodes == 1:
        node_rank = _env_int(env, "NODE_RANK", 0)
        if node_rank != 0:
            raise LaunchError(f"NODE_RANK={node_rank} with NNODES=1; set NNODES to the number of nodes")
        port = _env_int(env, "MASTER_PORT", None) or free_port()
        return Topology(nproc, 1, 0, env.get("MASTER_ADDR") or "127.0.0.1", port)
    missing = [name for name in ("NODE_RANK", "MASTER_ADDR") if not env.get(name, "").strip()]
    if missing:
        raise LaunchError(f"NNODES={nodes}: set {' and '.join(missing)} on every node (NODE_RANK 0..{nodes - 1}, "
                          f"MASTER_ADDR = the address of node 0, MASTER_PORT = a free port there, same on all)")
    node_rank = _env_int(env, "NODE_RANK", None)
    if not 0 <= node_rank < nodes:
        raise LaunchError(f"NODE_RANK={node_rank} is not in 0..{nodes - 1} (NNODES={nodes})")
    port = _env_int(env, "MASTER_PORT", DEFAULT_MULTI_NODE_PORT)
    return Topology(nproc, nodes, node_rank, env["MASTER_ADDR"].strip(), port)


def _rank_env(topology: Topology, local_rank: int) -> dict:
    from megatron_poet.training.process import LAUNCHER_PID_ENV

    env = dict(os.environ)
    env.update(
        RANK=str(topology.node_rank * topology.nproc_per_node + local_rank), LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(topology.world_size), LOCAL_WORLD_SIZE=str(topology.nproc_per_node),
        GROUP_RANK=str(topology.node_rank), MASTER_ADDR=topology.master_addr, MASTER_PORT=str(topology.master_port),
        PYTHONUNBUFFERED="1", **{LAUNCHER_PID_ENV: str(os.getpid())},
    )
    # The ranks import this checkout even when it is not installed.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    if topology.nproc_per_node > 1 and "OMP_NUM_THREADS" not in env:  # share the cores, as torchrun does
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // topology.nproc_per_node))
    return env


def _say(message: str) -> None:
    print(f"launcher: {message}", file=sys.stderr, flush=True)


class _Ranks:
    """This node's ranks, each the leader of its own process group (so terminal signals reach only
    the launcher, which forwards them, and a rank's children can be killed with it)."""

    def __init__(self, argv: list[str], topology: Topology):
        self.first_rank = topology.node_rank * topology.nproc_per_node
        command = [sys.executable, "-m", PROGRAM, *argv]
        self.procs = [subprocess.Popen(command, env=_rank_env(topology, i), start_new_session=True)
                      for i in range(topology.nproc_per_node)]
        self._reaped: set[int] = set()

    def newly_exited(self) -> list[tuple[int, int]]:
        """``(rank, exit code)`` of ranks that ended since the last call; their process groups are killed
        right away (before the group id could be reused)."""
        ended = []
        for i, p in enumerate(self.procs):
            if i not in self._reaped and p.poll() is not None:
                self._reaped.add(i)
                _kill_group(p.pid)
                ended.append((self.first_rank + i, p.returncode))
        return ended

    def all_exited(self) -> bool:
        """Whether :meth:`newly_exited` has returned every rank."""
        return len(self._reaped) == len(self.procs)

    def send(self, sig: int) -> None:
        """``sig`` to every running rank (not its children: data-loader workers must keep serving it)."""
        for i, p in enumerate(self.procs):
            if i not in self._reaped and p.returncode is None:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass

    def kill(self) -> None:
        """SIGKILL to the process group of every rank :meth:`newly_exited` has not returned yet."""
        for i, p in enumerate(self.procs):
            if i not in self._reaped:
                _kill_group(p.pid)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def supervise(ranks: _Ranks) -> int:
    """Wait for the ranks, forward stop signals, stop the others when one fails; returns the exit code."""
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in _STOP_SIGNALS}
    stop = failure = deadline = None
    forced = False
    try:
        while True:
            while received:
                sig = received.pop(0)
                if stop is None:
                    stop = sig
                    _say(f"{signal.Signals(sig).name}: every rank finishes its iteration, saves (with --save) and "
                         f"stops; send it again to stop at once")
                    ranks.send(signal.SIGTERM if sig == signal.SIGHUP else sig)
                else:
                    forced = True
                    ranks.kill()
            for rank, code in ranks.newly_exited():
                if stop is not None:
                    deadline = deadline or time.monotonic() + STOP_GRACE_S
                elif code != 0 and failure is None:
                    failure, deadline = (rank, code), time.monotonic() + FAILURE_GRACE_S
            if ranks.all_exited():
                break
            if deadline is not None and time.monotonic() > deadline:
                ranks.kill()
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        ranks.kill()
    return _report(stop, forced, failure)


def _report(stop: int | None, forced: bool, failure: tuple[int, int] | None) -> int:
    if stop is not None:
        name = signal.Signals(stop).name
        if forced:
            _say(f"stopped at once on a second {name}; the newest complete checkpoint is intact")
        else:
            _say(f"stopped on {name}; every rank has exited")
        return 128 + stop
    if failure is None:
        return 0
    rank, code = failure
    if code in (REPORTED_ERROR, DIVERGED):
        return code
    what = f"exited with code {code}" if code > 0 else f"was killed by {signal.Signals(-code).name}"
    hint = " (out of memory?)" if code == -signal.SIGKILL else ""
    _say(f"error: rank {rank} {what}{hint}; the other ranks were stopped")
    return code if code > 0 else 128 - code


def launch(argv: list[str], topology: Topology) -> int:
    """Run the program with ``argv`` on this node's ranks; returns the exit code for the shell."""
    nodes = f"node {topology.node_rank} of {topology.nnodes}" if topology.nnodes > 1 else "1 node"
    print(f"launcher: {topology.nproc_per_node} rank(s) on this node ({nodes}, world size {topology.world_size}), "
          f"rendezvous {topology.master_addr}:{topology.master_port}", flush=True)
    return supervise(_Ranks(argv, topology))


def environment_flags(env=None, data: str = "optional", checkpoint: str | None = None,
                      tensorboard: str | None = None) -> list[str]:
    """Program flags from the example scripts' variables DATA_PATH, TOKENIZER, CHECKPOINT_PATH, TENSORBOARD_DIR.

    Args:
        data: "optional" (unset DATA_PATH = the built-in corpus) or "required".
        checkpoint: None (unset CHECKPOINT_PATH = no checkpoints), "required", or the default directory.
            The directory is saved to and resumed from; it need not exist before the first run.
        tensorboard: None (unset TENSORBOARD_DIR = no TensorBoard) or "checkpoint" (default:
            CHECKPOINT_PATH/tensorboard).
    """
    env = os.environ if env is None else env
    flags: list[str] = []
    data_path = env.get("DATA_PATH", "").split()  # "PREFIX" or "W1 PREFIX1 W2 PREFIX2 ..."
    if data == "required" and not data_path:
        raise LaunchError("set DATA_PATH to the preprocessed data prefix (tools/preprocess_data.py --output-prefix)")
    if env.get("HF_MODEL") and not data_path:
        raise LaunchError(f"HF_MODEL needs DATA_PATH: data preprocessed with the model's tokenizer (python "
                          f"tools/preprocess_data.py --input corpus.txt --output-prefix data/corpus --tokenizer "
                          f"{env['HF_MODEL']} --append-eod)")
    if data_path:
        if env.get("HF_MODEL") and not env.get("TOKENIZER"):
            env = dict(env, TOKENIZER=env["HF_MODEL"])
        if not env.get("TOKENIZER"):
            raise LaunchError("set TOKENIZER to the tokenizer DATA_PATH was preprocessed with "
                              "(a tokenizer.json or its directory)")
        flags += ["--data-path", *data_path, "--tokenizer-model", env["TOKENIZER"]]
    ckpt = env.get("CHECKPOINT_PATH") or (None if checkpoint == "required" else checkpoint)
    if checkpoint == "required" and not ckpt:
        raise LaunchError("set CHECKPOINT_PATH to a checkpoint directory (on a filesystem all nodes share)")
    if ckpt:
        flags += ["--save", ckpt, "--load", ckpt]
    if env.get("HF_MODEL"):
        if not ckpt:
            raise LaunchError("HF_MODEL needs CHECKPOINT_PATH: the run's checkpoints (the imported model goes to "
                              "CHECKPOINT_PATH/hf_import)")
        flags.append("--use-checkpoint-args")  # the imported model's shape, also when the run resumes
        if not os.path.isfile(os.path.join(ckpt, "latest_checkpointed_iteration.txt")):
            flags += ["--load", os.path.join(ckpt, HF_IMPORT_DIR), "--finetune"]
    board = env.get("TENSORBOARD_DIR") or (os.path.join(ckpt, "tensorboard") if tensorboard and ckpt else None)
    if board:
        flags += ["--tensorboard-dir", board]
    return flags


def run_script(script: str, flags: list[str], argv: list[str], *, gpus_per_node: int | None = None,
               nnodes: int = 1, **env_options) -> int:
    """What an example script runs, as ``bash script [flags]`` and as ``torchrun script [flags]``.

    The program gets ``flags`` (the script's defaults), then the flags of the environment
    (:func:`environment_flags` with ``env_options``), then ``argv``: later flags win. Under
    torchrun (``LOCAL_RANK`` set) the program runs in this process; otherwise this process
    launches the node's ranks (``gpus_per_node``/``nnodes``: defaults of GPUS_PER_NODE/NNODES).
    """
    from megatron_poet.training.process import rank_from_env

    wants_help = "-h" in argv or "--help" in argv
    run_here = wants_help or "LOCAL_RANK" in os.environ
    if os.environ.get("HF_MODEL") and os.environ.get("CHECKPOINT_PATH") and not run_here:
        # Before the rendezvous port is chosen: the conversion runs a process group of its own.
        status = import_hf_model(os.environ["HF_MODEL"], os.environ["CHECKPOINT_PATH"], flags + argv)
        if status:
            return status
    try:
        try:
            defaults = flags + environment_flags(**env_options)
        except LaunchError:
            if not wants_help:
                raise
            defaults = flags  # the help needs no data or checkpoint directory
        topology = None if run_here else topology_from_env(gpus_per_node=gpus_per_node, nnodes=nnodes)
    except LaunchError as e:
        if rank_from_env() == 0:
            print(f"error: {e}", file=sys.stderr)
        return REPORTED_ERROR
    if wants_help and defaults and rank_from_env() == 0:
        print(f"{script} runs the program with these flags before yours (yours win):\n  {' '.join(defaults)}\n")
    if run_here:
        from megatron_poet.training.pretrain import main

        return main(defaults + argv)
    return launch(defaults + argv, topology)


HF_IMPORT_DIR = "hf_import"
# The program's flags that shape an imported model's checkpoint (its model flags come from config.json).
_IMPORT_FLAGS = ("poet", "poet_block_size", "poet_variant", "poet_neumann_terms", "poet_permutation_groups",
                 "tensor_model_parallel_size", "pipeline_model_parallel_size", "make_vocab_size_divisible_by")


def import_hf_model(hf_dir: str, checkpoint_path: str, argv: list[str]) -> int:
    """``HF_MODEL=DIR``: convert it into ``CHECKPOINT_PATH/hf_import`` once (tools/convert_from_hf.py), with
    the POET and layout flags of ``argv``; the run then starts from it with ``--finetune``. Returns an
    exit status (0: ready)."""
    target = os.path.join(checkpoint_path, HF_IMPORT_DIR)
    if os.path.exists(target) or os.path.isfile(os.path.join(checkpoint_path, "latest_checkpointed_iteration.txt")):
        return 0
    from megatron_poet.hf_import import HFImportError, convert_hf_model
    from megatron_poet.training.arguments import build_parser

    given = vars(build_parser().parse_known_args(argv)[0])
    flags = []
    for name in _IMPORT_FLAGS:
        flag, value = "--" + name.replace("_", "-"), given[name]
        if name == "poet_neumann_terms":
            flags += [flag, "exact" if value is None else str(value)]
        elif isinstance(value, bool):
            flags.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif value is not None:
            flags += [flag, str(value)]
    print(f"launcher: importing the Hugging Face model {hf_dir} into {target}", flush=True)
    try:
        convert_hf_model(hf_dir, target, flags)
    except HFImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return REPORTED_ERROR
    return 0


def main() -> int:
    """``python -m megatron_poet.launch [program flags]``: the program's own defaults on this node."""
    return run_script("python -m megatron_poet.launch", [], sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
