"""``regcache submit``: run ``regcache validate`` as a SLURM job on any number of nodes and GPUs.

One task per GPU (``--ntasks-per-node`` = GPUs per node), so Lightning's SLURM environment maps
nodes × tasks onto ``trainer.num_nodes`` × ``trainer.devices``. Validation jobs are never requeued.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
from pathlib import Path

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={gpus_per_node}
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --time={time}
#SBATCH --output={log_dir}/%x-%j.out
#SBATCH --no-requeue
{extra_directives}
set -euo pipefail
export NCCL_ASYNC_ERROR_HANDLING=1
srun regcache validate {config_args} \\
    --trainer.num_nodes={nodes} --trainer.devices={gpus_per_node} --trainer.strategy=ddp \\
    --trainer.plugins='{plugin}' {overrides}
"""
SLURM_PLUGIN = (
    '{"class_path": "lightning.pytorch.plugins.environments.SLURMEnvironment", "init_args": {"auto_requeue": false}}'
)


def render(
    configs: list[str],
    nodes: int = 1,
    gpus_per_node: int = 1,
    cpus_per_task: int = 8,
    time: str = "04:00:00",
    job_name: str = "regcache",
    log_dir: str = "slurm_logs",
    partition: str | None = None,
    account: str | None = None,
    overrides: list[str] | None = None,
) -> str:
    """The sbatch script for a validate run."""
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError("nodes and gpus_per_node must be at least 1")
    directives = [f"#SBATCH --{k}={v}" for k, v in (("partition", partition), ("account", account)) if v]
    return TEMPLATE.format(
        job_name=job_name,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task,
        time=time,
        log_dir=log_dir,
        extra_directives="\n".join(directives),
        config_args=" ".join(f"--config {shlex.quote(c)}" for c in configs),
        plugin=SLURM_PLUGIN,
        overrides=" ".join(shlex.quote(o) for o in overrides or []),
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``regcache submit``."""
    parser = argparse.ArgumentParser(prog="regcache submit", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", required=True, help="validate config (repeatable)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--time", default="04:00:00")
    parser.add_argument("--job-name", default=None)
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--log-dir", default="slurm_logs")
    parser.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    args, overrides = parser.parse_known_args(argv)
    script = render(
        args.config,
        args.nodes,
        args.gpus_per_node,
        args.cpus_per_task,
        args.time,
        args.job_name or Path(args.config[-1]).stem,
        args.log_dir,
        args.partition,
        args.account,
        overrides,
    )
    if args.dry_run:
        print(script)
        return 0
    if shutil.which("sbatch") is None:
        raise SystemExit("regcache submit: sbatch not found (not on a SLURM login node?); --dry-run prints the script")
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["sbatch"], input=script, text=True, capture_output=True, check=False)
    print(proc.stdout.strip() or proc.stderr.strip())
    return proc.returncode
