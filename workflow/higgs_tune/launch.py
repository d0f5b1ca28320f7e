"""Start training with ``accelerate launch``: one process, N processes on one node, or one process
group across the nodes of a Slurm allocation. The train rule calls this; it renders the command.

    python -m higgs_tune.launch --processes-per-node 4 [--config-file config/accelerate.yaml] -- TRAIN_ARGS

* Processes: ``--processes-per-node`` (the rule passes the GPUs granted, ``resources.gpu``, or
  ``train.processes`` where no GPU is granted: CPU processes on gloo) times the nodes.
* Nodes: inside a Slurm allocation of ``SLURM_JOB_NUM_NODES`` > 1 nodes, one launcher per node is
  started with ``srun --overlap --nodes N --ntasks-per-node 1``; each passes ``--machine_rank $SLURM_NODEID``
  and all meet at the first host of ``SLURM_JOB_NODELIST`` (``scontrol show hostnames``) on
  ``--port`` (default 29500 + ``SLURM_JOB_ID`` mod 1000, so two jobs sharing a node do not collide).
* The accelerate config is always the repo's (``--config_file``), never the user's default config.

Signals (see :func:`run`): SIGTERM, SIGUSR1 and SIGINT, whether sent to this process alone or to
every process of the Slurm step, reach every trainer; each finishes its optimizer step, checkpoints
and exits. This command waits for every process it started (it is their subreaper), then exits with
:data:`higgs_tune.train.EXIT_PREEMPTED` (75) and removes the train outputs, so that a rerun resumes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

EXIT_PREEMPTED = 75  # == train.EXIT_PREEMPTED (not imported: this module must not import torch)


def accelerate_command(train_args: list[str], *, processes_per_node: int, nodes: int = 1,
                       machine_rank: int | str = 0, main_host: str | None = None, port: int = 29500,
                       config_file: str = "config/accelerate.yaml") -> list[str]:
    """The ``accelerate launch`` argv for one node.

    Args:
        train_args: arguments of ``python -m higgs_tune.train``.
        processes_per_node: processes on this node (one per GPU; CPU processes use gloo).
        nodes: machines in the process group; ``machine_rank`` this node's rank (or a shell
            variable such as ``$SLURM_NODEID``, expanded on the node); ``main_host``/``port`` the
            rendezvous (required when ``nodes > 1``).

    Raises:
        ValueError: ``nodes > 1`` without ``main_host``, or a non-positive count.
    """
    if processes_per_node < 1 or nodes < 1:
        raise ValueError(f"processes_per_node={processes_per_node}, nodes={nodes}: both must be >= 1")
    total = processes_per_node * nodes
    cmd = ["accelerate", "launch", "--config_file", config_file, "--num_processes", str(total),
           "--num_machines", str(nodes), "--mixed_precision", "no", "--dynamo_backend", "no"]
    if total > 1:
        cmd.append("--multi_gpu")  # one process per device; on a machine without GPUs, gloo on CPU
    if nodes > 1:
        if not main_host:
            raise ValueError("a multi-node launch needs the rendezvous host (main_host)")
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", main_host, "--main_process_port", str(port),
                "--same_network"]
    return cmd + ["-m", "higgs_tune.train", *train_args]


def slurm_command(train_args: list[str], *, processes_per_node: int, nodes: int, main_host: str, port: int,
                  config_file: str = "config/accelerate.yaml") -> list[str]:
    """The ``srun`` argv that starts one accelerate launcher per node of the allocation; each node's
    rank comes from its own ``$SLURM_NODEID``."""
    inner = accelerate_command(train_args, processes_per_node=processes_per_node, nodes=nodes,
                               machine_rank="$SLURM_NODEID", main_host=main_host, port=port, config_file=config_file)
    script = " ".join(a if a == "$SLURM_NODEID" else shlex.quote(a) for a in inner)
    # --overlap: this runs inside the Snakemake job's own step, which holds the allocation's CPUs
    return ["srun", "--overlap", "--nodes", str(nodes), "--ntasks", str(nodes), "--ntasks-per-node", "1",
            "--kill-on-bad-exit=1", "bash", "-c", script]


def slurm_layout(env: dict[str, str]) -> tuple[int, str | None, int]:
    """``(nodes, first_host, port)`` of the Slurm allocation in ``env`` (1 node when not in Slurm)."""
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    if nodes <= 1:
        return 1, None, 29500
    hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                           text=True, check=True).stdout.split()
    return nodes, hosts[0], 29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000


def _arg(train_args: list[str], flag: str) -> str | None:
    for i, a in enumerate(train_args[:-1]):
        if a == flag:
            return train_args[i + 1]
    return None


#: the train rule's declared outputs (flags of ``python -m higgs_tune.train``): removed after a run
#: that did not finish, so that no target takes a preempted or failed run's files as done
OUTPUT_FLAGS = ("--metrics", "--val-metrics", "--predictions", "--adapter", "--checkpoint", "--state", "--tensorboard")
#: the trainer writes the step it checkpointed at to this file (a path the launcher chooses) when it
#: stops for a preemption: the launcher's channel, not a declared output
PREEMPTED_FILE_ENV = "HIGGS_TUNE_PREEMPTED_FILE"
#: torchrun's agent: also handle SIGUSR1 (by default it dies of it) and pass it on to the workers;
#: wait this long (s) for them to checkpoint before SIGKILL (torchrun's default: 30 s)
AGENT_ENV = {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "900"}
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux ``prctl``), so that a worker
    whose parent (accelerate, torchrun's agent) dies stays this process's child, and is waited for."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _descendants(root: int) -> list[tuple[int, list[str]]]:
    """``(pid, argv)`` of every living descendant of ``root`` (from ``/proc``; empty where there is none)."""
    children: dict[int, list[int]] = {}
    argv: dict[int, list[str]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            argv[int(d.name)] = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except (OSError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append((pid, argv.get(pid, [])))
        todo += children.get(pid, [])
    return out


def is_trainer(argv: list[str]) -> bool:
    """Whether ``argv`` is a training process (``python [options] -m higgs_tune.train ...``), not a
    launcher (``accelerate launch ... -m higgs_tune.train``, torchrun's agent)."""
    for i, a in enumerate(argv[1:], start=1):
        if a == "-m":
            return argv[i + 1:i + 2] == ["higgs_tune.train"]
        if not a.startswith("-"):
            return False
    return False


def _signal_targets(root: int) -> list[int]:
    """The processes a signal to the launcher is passed to: the trainers (they finish the step,
    checkpoint and exit) and ``srun`` (which passes it to the other nodes' tasks); never torchrun's
    agent or accelerate, which would stop or kill the trainers."""
    return [pid for pid, argv in _descendants(root)
            if is_trainer(argv) or (argv and os.path.basename(argv[0]) == "srun")]


def remove_outputs(train_args: list[str]) -> list[str]:
    """Delete the train rule's declared outputs named in ``train_args``; returns those removed."""
    gone = []
    for flag in OUTPUT_FLAGS:
        p = _arg(train_args, flag)
        if p is None or not os.path.lexists(p):
            continue
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        gone.append(p)
    return gone


def run(cmd: list[str], train_args: list[str] | None = None) -> int:
    """Run ``cmd`` (accelerate launch, or srun) in its own session and return the training's status.

    SIGTERM, SIGUSR1 and SIGINT (Slurm's preemption, ``scancel``, ``--signal``; every repeat too)
    are passed to the trainers among this process's descendants (whatever their session) and to
    ``srun``; torchrun's agent is told (``PET_SIGNALS_TO_HANDLE``) to pass SIGUSR1 on rather than
    die of it, for when Slurm signals every process of the step. This process is a child subreaper:
    it returns only once every descendant has exited.

    Returns:
        75 (:data:`EXIT_PREEMPTED`) when a trainer stopped for a preemption (signal or the Slurm
        job's end time, reported through ``$HIGGS_TUNE_PREEMPTED_FILE``) or a signal arrived and the
        run did not finish; else the launch's own status. On any non-zero status the train outputs
        in ``train_args`` are removed (the rows are in the resume checkpoint): a rerun resumes.
    """
    train_args = train_args or []
    _become_subreaper()
    resume = _arg(train_args, "--resume-dir")
    marker_dir = Path(resume) if resume else Path(tempfile.gettempdir())
    marker_dir.mkdir(parents=True, exist_ok=True)
    marker = marker_dir / f".preempted-{socket.gethostname()}-{os.getpid()}"
    marker.unlink(missing_ok=True)
    env = {**os.environ, **AGENT_ENV, PREEMPTED_FILE_ENV: str(marker)}
    got: list[int] = []

    def forward(signum, frame):
        got.append(signum)
        for pid in _signal_targets(os.getpid()):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for s in SIGNALS:
        signal.signal(s, forward)
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    rc = proc.wait()
    while True:  # orphaned workers are our children now: wait for every one
        try:
            os.wait()
        except ChildProcessError:
            break
    preempted = marker.is_file() or (bool(got) and rc != 0)
    marker.unlink(missing_ok=True)
    if preempted:
        rc = EXIT_PREEMPTED
    if rc != 0:
        gone = remove_outputs(train_args)
        print(f"launch: exit {rc}{' (preempted: rerun to resume)' if preempted else ''}; removed the "
              f"unfinished run's outputs: {' '.join(gone) or 'none'}", flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m higgs_tune.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--processes-per-node", type=int, required=True)
    parser.add_argument("--config-file", default="config/accelerate.yaml")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: arguments of higgs_tune.train")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    nodes, host, port = slurm_layout(dict(os.environ))
    if nodes > 1:
        cmd = slurm_command(train_args, processes_per_node=args.processes_per_node, nodes=nodes, main_host=host,
                            port=port, config_file=args.config_file)
    else:
        cmd = accelerate_command(train_args, processes_per_node=args.processes_per_node, config_file=args.config_file)
    print("launch:", shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    return run(cmd, train_args)


if __name__ == "__main__":
    sys.exit(main())
