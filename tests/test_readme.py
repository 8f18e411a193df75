"""The README's promises: two set-up commands at the top, CI runs them, the Python snippet runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_two_setup_commands_and_ci_runs_the_test_command():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert len(commands) == 2
    assert "regcache demo" in commands[0]
    *installs, test = commands[1].split("&&")  # the test extra, then the CLIP_benchmark oracle without its deps
    ci = (ROOT / ".ci" / "run").read_text()
    assert installs and all(install.strip() in ci for install in installs) and test.strip() in ci


def test_python_snippet_runs(tmp_path, monkeypatch):
    snippet = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert scope["features"].shape == (2, 64)
    assert torch.isfinite(scope["features"]).all()
    assert (tmp_path / "calib.safetensors").is_file()


def test_regcache_snippet_runs_at_tiny_scale(tmp_path, monkeypatch, single_thread):
    """The RegCache snippet: self-contained, a small grid, the chosen configuration installed and quantized."""
    from regcache.registers import SearchPoint

    snippet = re.findall(r"```python\n(.*?)```", README, re.S)[1]
    assert "apply_regcache" in snippet
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    result, best, encoder = scope["result"], scope["best"], scope["encoder"]
    registers, taus, ks = 4, 3, 2  # k=4 candidates; taus [1, 2, 4]; k̃ in [1, 2] for "both" (0 is prefix-only)
    assert len(result.search.rows) == 1 + registers * taus + registers * taus * ks  # base + prefix + both
    assert best.mode in ("prefix", "both") and best == SearchPoint.from_dict(result.search.best_of(["prefix", "both"]))
    assert all(b.attn.prefix is not None for b in encoder.blocks[best.l_start :])
    assert encoder.quant_config.tag == "naive-W6A6"
    assert (tmp_path / "search.json").is_file()
    assert scope["features"].shape == (8, 64) and torch.isfinite(scope["features"]).all()
