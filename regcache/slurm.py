"""``regcache submit``: run ``regcache validate`` as a SLURM job on any number of nodes and GPUs.

One task per GPU (``--ntasks-per-node`` = GPUs per node), so Lightning's SLURM environment maps
nodes × tasks onto ``trainer.num_nodes`` × ``trainer.devices``. Validation jobs are never requeued.
Before anything is written or submitted, the options are checked (an unknown or misspelled option
is an error, never a validate override), the configuration is parsed as ``regcache validate``
parses it, and every ``#SBATCH`` value is checked against what SLURM accepts.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from regcache.lightning_cli import ConfigError, check_args, default_run_dir

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={gpus_per_node}
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --mem={mem}
#SBATCH --time={time}
#SBATCH --output={log_dir}/%x-%j.out
#SBATCH --no-requeue
{extra_directives}
set -euo pipefail
{activate}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1  # a failed collective ends the job instead of hanging it
srun regcache validate {config_args} \\
    --trainer.num_nodes={nodes} --trainer.devices={gpus_per_node} --trainer.strategy=ddp \\
    --trainer.plugins='{plugin}' {overrides}
"""
SLURM_PLUGIN = (
    '{"class_path": "lightning.pytorch.plugins.environments.SLURMEnvironment", "init_args": {"auto_requeue": false}}'
)
# what SLURM accepts for each value written into an #SBATCH line (nothing that could end the line)
SBATCH_VALUES = {
    "time": (r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}", "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
    "mem": (r"\d+[KMGT]?", "a size such as 64G or 65536M"),
    "job_name": (r"[A-Za-z0-9][A-Za-z0-9._+-]*", "letters, digits and . _ + -"),
    "partition": (r"[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*", "a partition name (or a comma-separated list)"),
    "account": (r"[A-Za-z0-9._-]+", "an account name"),
    "log_dir": (r"[^\s%'\"\\]+", "a path without whitespace, quotes, backslashes or %"),
}
# validate options that submit sets from --nodes / --gpus-per-node: a second value would disagree with SLURM
RESERVED = ("--trainer.num_nodes", "--trainer.devices", "--trainer.strategy", "--trainer.plugins")
VALIDATE_TOP_LEVEL = ("--seed_everything",)


class SubmitError(ValueError):
    """A ``regcache submit`` option, configuration or #SBATCH value that cannot be submitted."""


def check_sbatch_value(option: str, value: str) -> str:
    """``value`` if SLURM accepts it for ``option`` (see SBATCH_VALUES), else SubmitError naming the option."""
    pattern, allowed = SBATCH_VALUES[option]
    if not re.fullmatch(pattern, value):
        flag = "--" + option.replace("_", "-")
        raise SubmitError(f"{flag} {value!r} is not a valid #SBATCH value: use {allowed}")
    return value


def default_activate() -> str:
    """Shell line that activates the submitting Python environment in the job (virtualenv or conda)."""
    if sys.prefix != sys.base_prefix and (Path(sys.prefix) / "bin" / "activate").is_file():
        return f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}"
    conda = os.environ.get("CONDA_PREFIX")
    if conda:
        return f'eval "$(conda shell.bash hook)" && conda activate {shlex.quote(conda)}'
    return f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH"


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
    mem: str | None = None,
    activate: str | None = None,
) -> str:
    """The sbatch script for a validate run (``mem`` default: 32G per GPU; ``activate``: the submitting env)."""
    if nodes < 1 or gpus_per_node < 1 or cpus_per_task < 1:
        raise SubmitError("--nodes, --gpus-per-node and --cpus-per-task must be at least 1")
    mem = mem or f"{32 * gpus_per_node}G"
    values = {"time": time, "mem": mem, "job_name": job_name, "log_dir": log_dir}
    values |= {k: v for k, v in (("partition", partition), ("account", account)) if v}
    for option, value in values.items():
        check_sbatch_value(option, value)
    activate = default_activate() if activate is None else activate
    if "\n" in activate or "\r" in activate:
        raise SubmitError("--activate must be one shell line (join commands with &&)")
    directives = [f"#SBATCH --{k}={v}" for k, v in (("partition", partition), ("account", account)) if v]
    return TEMPLATE.format(
        job_name=job_name,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task,
        mem=mem,
        time=time,
        log_dir=log_dir,
        extra_directives="\n".join(directives),
        activate=activate or "# (no environment activation: --activate '')",
        config_args=" ".join(f"--config {shlex.quote(c)}" for c in configs),
        plugin=SLURM_PLUGIN,
        overrides=" ".join(shlex.quote(o) for o in overrides or []),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="regcache submit",
        description=__doc__.splitlines()[0],
        allow_abbrev=False,  # --dry would otherwise mean --dry-run, and --node --nodes
        epilog="Other options must be dotted validate options (--data.root DIR, --model.w_bits 6, ...).",
    )
    parser.add_argument("--config", action="append", required=True, help="validate config (repeatable)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=1)
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--mem", default=None, help="memory per node (#SBATCH --mem; default 32G per GPU)")
    parser.add_argument("--time", default="04:00:00")
    parser.add_argument("--job-name", default=None)
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--log-dir", default="slurm_logs")
    parser.add_argument(
        "--activate", default=None, help="shell line activating the environment in the job (default: this one's)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    return parser


def check_overrides(parser: argparse.ArgumentParser, overrides: list[str]) -> None:
    """Every left-over option must be a dotted validate option; a misspelled submit option is an error."""
    own = [opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")]
    for arg in overrides:
        if not arg.startswith("--"):
            continue
        name = arg.split("=", 1)[0]
        if name.startswith(RESERVED):
            raise SubmitError(f"{name} is set by regcache submit: use --nodes / --gpus-per-node instead")
        if "." in name or name in VALIDATE_TOP_LEVEL:
            continue
        close = difflib.get_close_matches(name.replace("_", "-"), own, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SubmitError(f"unknown option {name}{hint}; validate options are dotted, e.g. --data.root DIR")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``regcache submit``."""
    parser = _parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        check_overrides(parser, overrides)
        script = render(
            args.config,
            args.nodes,
            args.gpus_per_node,
            args.cpus_per_task,
            args.time,
            args.job_name or default_run_dir(args.config).removeprefix("runs/"),
            args.log_dir,
            args.partition,
            args.account,
            overrides,
            args.mem,
            args.activate,
        )
        try:
            check_args([arg for c in args.config for arg in ("--config", c)] + overrides)
        except ConfigError as e:
            raise SubmitError(f"the configuration does not parse as `regcache validate` parses it:\n{e}") from None
    except SubmitError as e:
        print(f"regcache submit: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(script)
        return 0
    if shutil.which("sbatch") is None:
        raise SystemExit("regcache submit: sbatch not found (not on a SLURM login node?); --dry-run prints the script")
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["sbatch"], input=script, text=True, capture_output=True, check=False)
    print(proc.stdout.strip() or proc.stderr.strip())
    return proc.returncode
