"""Start training with ``accelerate launch``: one process, N processes on one node, or one process
group across the nodes of a Slurm allocation. The train rule calls this; it renders the command.

    python -m higgs_tune.launch --processes-per-node 4 [--config-file config/accelerate.yaml] -- TRAIN_ARGS

* Processes: ``--processes-per-node`` (the rule passes the GPUs granted, ``resources.gpu``, or
  ``train.processes`` where no GPU is granted: CPU processes on gloo) times the nodes.
* Nodes: inside a Slurm job of N > 1 nodes, one launcher per node is started with ``srun --jobid JOB
  --overlap --nodes N --ntasks-per-node 1`` (the job step's ``SLURM_*`` limits removed for it); each
  passes ``--machine_rank $SLURM_NODEID`` and all meet at the first node's address on ``--port``
  (29500 + ``SLURM_JOB_ID`` mod 1000, so two jobs sharing a node do not collide). The layout is
  asked of Slurm (``scontrol show job``/``hostnames``/``node``), not read from the environment:
  the Snakemake jobstep executor runs the rule in an ``srun -n1`` step that sees one node.
* The accelerate config is always the repo's (``--config_file``), never the user's default config.

Signals (see :func:`run`): SIGTERM, SIGUSR1 and SIGINT, whether sent to this process alone or to
every process of the Slurm step, reach every trainer; each finishes its optimizer step, checkpoints
and exits. This command waits for every process it started (it is their subreaper), then exits with
:data:`higgs_tune.train.EXIT_PREEMPTED` (75) and removes the train outputs, so that a rerun resumes.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
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
    if total > 1 and nodes == 1:
        # port 0: accelerate picks a free port, so two trainings on one machine (two experiments' train
        # jobs under the local profile) do not both wait for torchrun's default 29500
        cmd += ["--main_process_port", "0"]
    if nodes > 1:
        if not main_host:
            raise ValueError("a multi-node launch needs the rendezvous host (main_host)")
        cmd += ["--machine_rank", str(machine_rank), "--main_process_ip", main_host, "--main_process_port", str(port),
                "--same_network"]
    return cmd + ["-m", "higgs_tune.train", *train_args]


def slurm_command(train_args: list[str], *, processes_per_node: int, layout: "SlurmLayout",
                  env: dict[str, str] | None = None, config_file: str = "config/accelerate.yaml") -> list[str]:
    """The argv that starts one accelerate launcher on every node of the allocation ``layout``
    (``srun --jobid JOB --overlap --nodes N --ntasks N --ntasks-per-node 1``); each node's rank comes
    from its own ``$SLURM_NODEID``, rank 0 on the first node, where the rendezvous is.

    The command runs inside the job step that the Snakemake executor started with ``srun -n1`` on
    one node: that step's ``SLURM_*`` variables (``SLURM_NNODES=1``, ``SLURM_NTASKS=1``,
    ``SLURM_JOB_NODELIST`` of that one node, ...) would be read by ``srun`` as the limits of the
    new step ("Only allocated 1 nodes asked for 2"), so every ``SLURM_*`` variable of ``env`` except
    ``SLURM_CONF`` and the job id is removed for it (``env -u``). ``--overlap``: the rule's own step
    holds CPUs (and GPUs) of the first node.
    """
    inner = accelerate_command(train_args, processes_per_node=processes_per_node, nodes=layout.nodes,
                               machine_rank="$SLURM_NODEID", main_host=layout.main_host, port=layout.port,
                               config_file=config_file)
    # each node says where it runs (Slurm's node name) before it becomes its accelerate launcher
    script = (f'echo "launch: node ${{SLURMD_NODENAME:-$(hostname)}}, machine rank $SLURM_NODEID of {layout.nodes}"; '
              "exec " + " ".join(a if a == "$SLURM_NODEID" else shlex.quote(a) for a in inner))
    drop = sorted(k for k in (env or {}) if k.startswith("SLURM_") and k not in _KEEP_SLURM)
    cmd = ["env", *(f"--unset={k}" for k in drop)] if drop else []
    cmd += ["srun", "--jobid", layout.job_id, "--overlap", "--nodes", str(layout.nodes), "--ntasks", str(layout.nodes),
            "--ntasks-per-node", "1"]
    if layout.cpus_per_node:
        cmd.append(f"--cpus-per-task={layout.cpus_per_node}")
    return cmd + ["--kill-on-bad-exit=1", "bash", "-c", script]


_KEEP_SLURM = {"SLURM_CONF", "SLURM_JOB_ID", "SLURM_JOBID"}


@dataclass(frozen=True)
class SlurmLayout:
    """The nodes of the Slurm job the launcher runs in, as Slurm's controller reports them.

    Attributes:
        nodes: nodes allocated to the job (1 outside Slurm).
        hosts: their names, in Slurm's order (``scontrol show hostnames``); node rank i runs on hosts[i].
        main_host: the rendezvous address: the first node's ``NodeAddr`` (``scontrol show node``),
            its name where Slurm gives no address; None for one node.
        port: the rendezvous TCP port, 29500 + job id mod 1000 (two jobs sharing a node do not collide).
        job_id: ``SLURM_JOB_ID`` ("" outside Slurm).
        cpus_per_node: CPUs of the job per node (``CPUs/Task`` x tasks per node), for the
            launcher's step; None when Slurm does not say.
        gpus_per_node: GPUs asked per node (``TresPerNode``: ``--gres=gpu:N``, ``--gpus-per-node``);
            gpus_per_job: GPUs asked for the whole job (``TresPerJob``: ``--gpus``); None if not asked.
    """

    nodes: int
    hosts: tuple[str, ...] = ()
    main_host: str | None = None
    port: int = 29500
    job_id: str = ""
    cpus_per_node: int | None = None
    gpus_per_node: int | None = None
    gpus_per_job: int | None = None

    def check(self, processes_per_node: int) -> None:
        """Raise ValueError where ``processes_per_node`` on every node would not be one process per
        GPU of this multi-node job: GPUs asked per job (Slurm may split them unevenly over the
        nodes), or per node but another count."""
        if self.nodes <= 1:
            return
        if self.gpus_per_node is None and self.gpus_per_job:
            raise ValueError(
                f"Slurm job {self.job_id} asks for {self.gpus_per_job} GPUs for the whole job (--gpus) on {self.nodes} "
                "nodes, which Slurm may split unevenly: ask for GPUs per node (resources nodes: N and gres: "
                "'gpu:G' on the train rule, not gpu:)")
        if self.gpus_per_node is not None and self.gpus_per_node != processes_per_node:
            raise ValueError(
                f"Slurm job {self.job_id} has {self.gpus_per_node} GPU(s) per node but the launch asks for "
                f"--processes-per-node {processes_per_node}: one process per GPU (the train rule takes it from "
                "resources gres: 'gpu:G')")


def _gpus(tres: str | None) -> int | None:
    m = re.search(r"(?:^|,)gres[:/]gpu(?::[^:,]+)?:(\d+)(?:,|$)", tres or "")
    return int(m.group(1)) if m else None


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, check=True, timeout=60).stdout


def _field(record: str, key: str) -> str | None:
    m = re.search(rf"(?:^|\s){re.escape(key)}=(\S*)", record)
    return m.group(1) if m else None


def slurm_layout(env: dict[str, str]) -> SlurmLayout:
    """The layout of the Slurm job named by ``env`` (``SLURM_JOB_ID``), asked of Slurm itself:
    ``scontrol show job`` (NumNodes, NodeList, CPUs/Task, NumTasks), ``scontrol show hostnames``,
    ``scontrol show node`` (the first node's NodeAddr). Not from the step's environment: the
    Snakemake jobstep executor removes the job's ``SLURM_*`` variables and runs the rule in an
    ``srun -n1`` step, whose own ``SLURM_NNODES``/``SLURM_JOB_NODELIST`` name one node.

    Outside Slurm (no ``SLURM_JOB_ID``): one node.

    Raises:
        RuntimeError: inside a Slurm job whose layout ``scontrol`` cannot give (not on PATH, the
            controller unreachable, the job unknown, an unreadable answer): training on one node of
            an allocation of several would be silently wrong, so the launch stops.
    """
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or ""
    if not job:
        return SlurmLayout(nodes=1)
    try:
        record = _scontrol("show", "job", "--oneliner", job)
        nodes_field, nodelist = _field(record, "NumNodes"), _field(record, "NodeList")
        if not nodes_field or not nodelist or nodelist == "(null)":
            raise ValueError(f"no NumNodes/NodeList in {record.strip()[:300]!r}")
        nodes = int(nodes_field.split("-")[0])
        hosts = tuple(_scontrol("show", "hostnames", nodelist).split())
        if len(hosts) != nodes:
            raise ValueError(f"NumNodes={nodes} but NodeList={nodelist} names {len(hosts)} hosts")
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) and e.stderr else str(e)
        raise RuntimeError(
            f"running in Slurm job {job} (SLURM_JOB_ID) but its nodes could not be read with "
            f"`scontrol show job {job}`: {detail}. The launcher asks Slurm for the job's nodes (the job "
            "step's environment names one node); make scontrol reach this job's controller (PATH, "
            "SLURM_CONF), or unset SLURM_JOB_ID to train on this machine alone") from e
    if nodes == 1:
        return SlurmLayout(nodes=1, hosts=hosts, job_id=job)
    try:
        addr = _field(_scontrol("show", "node", "--oneliner", hosts[0]), "NodeAddr")
    except (OSError, subprocess.SubprocessError):
        addr = None
    tasks, cpus_per_task = _field(record, "NumTasks"), _field(record, "CPUs/Task")
    cpus = None
    if tasks and cpus_per_task and tasks.isdigit() and cpus_per_task.isdigit() and int(tasks) % nodes == 0:
        cpus = int(cpus_per_task) * (int(tasks) // nodes)
    return SlurmLayout(nodes=nodes, hosts=hosts, main_host=addr or hosts[0], port=29500 + (int(job) if job.isdigit() else 0) % 1000,
                       job_id=job, cpus_per_node=cpus, gpus_per_node=_gpus(_field(record, "TresPerNode")),
                       gpus_per_job=_gpus(_field(record, "TresPerJob")))


def _arg(train_args: list[str], flag: str) -> str | None:
    for i, a in enumerate(train_args[:-1]):
        if a == flag:
            return train_args[i + 1]
    return None


#: the train rule's declared outputs (flags of ``python -m higgs_tune.train``): removed after a run
#: that did not finish, so that no target takes a preempted or failed run's files as done
OUTPUT_FLAGS = ("--metrics", "--val-metrics", "--predictions", "--adapter", "--checkpoint", "--state", "--tensorboard",
                "--steps")
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
    try:
        layout = slurm_layout(dict(os.environ))
        layout.check(args.processes_per_node)
    except (RuntimeError, ValueError) as e:
        print(f"python -m higgs_tune.launch: error: {e}", file=sys.stderr)
        return 2
    if layout.nodes > 1:
        cmd = slurm_command(train_args, processes_per_node=args.processes_per_node, layout=layout,
                            env=dict(os.environ), config_file=args.config_file)
    else:
        cmd = accelerate_command(train_args, processes_per_node=args.processes_per_node, config_file=args.config_file)
    print("launch:", shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    return run(cmd, train_args)


if __name__ == "__main__":
    sys.exit(main())
