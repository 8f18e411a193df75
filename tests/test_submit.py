"""`regcache submit`: options checked, the configuration parsed as validate parses it, a safe sbatch script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from regcache.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
GRID = "train_configs/grid/openclip_b16_laion2b_naive_w6a6.yaml"


@pytest.fixture
def no_sbatch(monkeypatch):
    """Record any sbatch call instead of making it (none may happen in these tests)."""
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or pytest.fail("sbatch was called"))
    monkeypatch.chdir(ROOT)
    return calls


def _submit(*extra: str) -> int:
    return cli_main(["submit", "--config", "train_configs/base.yaml", "--config", GRID, *extra])


def test_dry_run_script_maps_nodes_and_gpus_and_sets_up_the_job(capsys, no_sbatch):
    argv = ["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "02:00:00"]
    assert _submit(*argv, "--data.root=/datasets", "--dry-run") == 0
    script = capsys.readouterr().out
    lines = script.splitlines()
    directives = {ln.split("=", 1)[0]: ln.split("=", 1)[1] for ln in lines if ln.startswith("#SBATCH --") and "=" in ln}
    assert directives == {
        "#SBATCH --job-name": "base_openclip_b16_laion2b_naive_w6a6",
        "#SBATCH --nodes": "2",
        "#SBATCH --ntasks-per-node": "4",  # one task per GPU
        "#SBATCH --gpus-per-node": "4",
        "#SBATCH --cpus-per-task": "8",
        "#SBATCH --mem": "128G",  # 32G per GPU
        "#SBATCH --time": "02:00:00",
        "#SBATCH --output": "slurm_logs/%x-%j.out",
        "#SBATCH --partition": "gpu",
    }
    assert "#SBATCH --no-requeue" in lines
    # the job runs in the submitting environment, with the current NCCL variable (not the deprecated one)
    activate = Path(sys.prefix) / "bin" / "activate"
    if sys.prefix != sys.base_prefix and activate.is_file():
        assert f"source {activate}" in lines
    assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script and " NCCL_ASYNC_ERROR_HANDLING" not in script
    assert lines.index("set -euo pipefail") < next(i for i, ln in enumerate(lines) if ln.startswith("srun "))
    assert f"srun regcache validate --config train_configs/base.yaml --config {GRID}" in script
    assert "--trainer.num_nodes=2 --trainer.devices=4 --trainer.strategy=ddp" in script
    assert '"auto_requeue": false' in script and script.rstrip().endswith("--data.root=/datasets")
    assert no_sbatch == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dryrun"], "unknown option --dryrun (did you mean --dry-run?)"),
        (["--gpus_per_node", "4", "--dry-run"], "unknown option --gpus_per_node (did you mean --gpus-per-node?)"),
        (["--dry", "--dry-run"], "unknown option --dry"),  # no abbreviations: --dry is not --dry-run
        (["--trainer.devices", "2"], "--trainer.devices is set by regcache submit: use --nodes / --gpus-per-node"),
        (["--time", "01:00:00\n#SBATCH --exclusive"], "--time '01:00:00\\n#SBATCH --exclusive' is not a valid #SBATCH"),
        (["--job-name", "a b"], "--job-name 'a b' is not a valid #SBATCH value"),
        (["--mem", "lots"], "--mem 'lots' is not a valid #SBATCH value"),
        (["--partition", "gpu\n#SBATCH --qos=high"], "--partition 'gpu\\n#SBATCH --qos=high' is not a valid"),
        (["--model.w_bitz", "6"], "does not parse as `regcache validate` parses it:\nerror: "),
        (["--model.w_bits", "six"], "does not parse as `regcache validate` parses it:\nerror: "),
    ],
)
def test_bad_options_values_or_config_are_refused_before_anything_is_written(extra, message, capsys, no_sbatch):
    assert _submit(*extra) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""  # no script printed, nothing submitted
    assert no_sbatch == []


def test_missing_config_file_is_refused(capsys, no_sbatch):
    assert cli_main(["submit", "--config", "train_configs/grid/nope.yaml", "--dry-run"]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_readme_submit_command_dry_run(capsys, no_sbatch):
    from test_cli_compose import readme_command

    argv = readme_command("submit")
    assert "--dry-run" in argv and argv.count("--config") == 5
    assert cli_main(["submit", *argv]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=4" in script
    assert "#SBATCH --partition=gpu" in script and "#SBATCH --time=02:00:00" in script
    assert script.rstrip().endswith("--data.root /datasets/clip_benchmark")
