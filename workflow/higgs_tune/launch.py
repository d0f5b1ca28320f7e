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

Signals: SIGTERM and SIGUSR1 (Slurm preemption, ``--signal`` lead time) are passed to every process
of the launch; the trainer finishes its optimizer step, checkpoints and exits. This command then
exits with :data:`higgs_tune.train.EXIT_PREEMPTED` (75) when the trainer's state file (``--state`` in
the train args) records the preemption, else with the launcher's own status.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
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


def _state_path(train_args: list[str]) -> Path | None:
    for i, a in enumerate(train_args[:-1]):
        if a == "--state":
            return Path(train_args[i + 1])
    return None


def run(cmd: list[str], state: Path | None) -> int:
    """Run ``cmd`` in its own process group, pass SIGTERM/SIGUSR1 to the whole group, wait until every
    process of it has exited; return 75 when the trainer checkpointed on a signal."""
    proc = subprocess.Popen(cmd, start_new_session=True)
    got: list[int] = []

    def forward(signum, frame):
        got.append(signum)
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, forward)
    rc = proc.wait()
    while True:  # the launcher may die of the signal before its workers finish their checkpoint
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            break
        time.sleep(0.2)
    if rc != 0 and state is not None and state.is_file():
        try:
            if json.loads(state.read_text()).get("preempted"):
                return EXIT_PREEMPTED
        except (OSError, ValueError):
            pass
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
    return run(cmd, _state_path(train_args))


if __name__ == "__main__":
    sys.exit(main())
