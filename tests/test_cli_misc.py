"""`regcache report` and the command dispatcher (`regcache submit`: tests/test_submit.py)."""

from __future__ import annotations

import json

import pytest

from regcache.cli import main as cli_main
from regcache.report import load_runs


def _run(tmp_path, name, method, bits, regcache, top1, artifacts=()):
    d = tmp_path / name
    d.mkdir()
    record = {
        "model": "ViT-B-16",
        "pretrained": "laion2b_s34b_b88k",
        "method": method,
        "w_bits": bits,
        "a_bits": bits,
        "regcache": regcache,
        "metrics": {"imagenet1k/zeroshot_top1": top1, "imagenet1k/zeroshot_top5": 0.9},
        "artifacts": [{"kind": kind, "key": "k", "reused": reused} for kind, reused in artifacts],
    }
    (d / "metrics.json").write_text(json.dumps(record))
    return d


def test_report_table(tmp_path, capsys):
    runs = [
        _run(tmp_path, "a", "naive", 6, None, 0.5819, [("calibration", False)]),
        _run(tmp_path, "b", "naive", 6, {"l_q": 6, "tau": 3, "k_delete": 2}, 0.6665, [("register_search", True)]),
        _run(tmp_path, "c", "float", None, None, 0.70),
    ]
    assert cli_main(["report", *map(str, runs), "--out", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "| model | bits | method | RegCache | reused | imagenet1k/zeroshot_top1 |"
    assert out[2] == "| ViT-B-16 | FP | float | – | – | 70.00 |"
    assert out[3] == "| ViT-B-16 | W6A6 | naive | – | – | 58.19 |"  # computed its calibration
    assert out[4] == "| ViT-B-16 | W6A6 | naive | l_q=6, τ=3, k̃=2 | register search | 66.65 |"
    assert (tmp_path / "t.md").read_text().strip() == "\n".join(out)
    with pytest.raises(FileNotFoundError, match=r"metrics\.json"):
        load_runs([tmp_path / "missing"])


def test_unknown_command(capsys):
    assert cli_main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_bytecode_cache_hint_only_when_imports_were_slow_and_bytecode_is_not_cached(monkeypatch):
    import sys

    from regcache.module import bytecode_cache_hint

    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert bytecode_cache_hint(3.0) is None
    hint = bytecode_cache_hint(17.4)
    assert hint.startswith("start-up imports took 17 s") and "PYTHONPYCACHEPREFIX" in hint
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert bytecode_cache_hint(17.4) is None


@pytest.mark.parametrize("argv", [["--help"], ["submit", "--help"]])
def test_help_answers_without_importing_torch(argv):
    import subprocess
    import sys

    code = (
        "import sys, regcache.cli\n"
        f"try:\n    regcache.cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'lightning', 'timm') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "usage: regcache" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "[]"


def test_lazy_package_attributes():
    import regcache as rc

    assert rc.load_model.__module__ == "regcache.loading" and rc.NaiveConfig.__name__ == "NaiveConfig"
    assert set(rc.__all__) <= set(dir(rc))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = rc.nope


def test_validate_run_prints_no_lightning_noise(tmp_path):
    """No advert tips, no LightningCLI args warning, no LeafSpec deprecation in a plain validate run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "regcache.cli", "validate", "--config", str(root / "train_configs" / "demo.yaml")]
    cmd += ["--trainer.callbacks.init_args.enabled=false", "--model.method=float", "--trainer.limit_val_batches=1"]
    cmd += [f"--model.run_dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"results: {tmp_path / 'run' / 'metrics.json'}"
    for noise in ("Tip:", "args parameter is intended", "LeafSpec"):
        assert noise not in proc.stdout + proc.stderr, noise
