"""Progress output: the zero-shot head's bar over text batches, and train_configs/demo.yaml's bars."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import yaml

from regcache.eval import build_zeroshot_classifier
from regcache.testbed import load_testbed

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "train_configs" / "demo.yaml"


class Terminal(io.StringIO):
    """A captured stream that says it is a terminal, as an interactive stderr does."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def testbed():
    return load_testbed()


def _head_output(testbed, monkeypatch, stream: io.StringIO, **kwargs) -> str:
    monkeypatch.setattr(sys, "stderr", stream)
    head = build_zeroshot_classifier(
        testbed.model,
        testbed.tokenizer,
        ["cat", "dog", "ship"],
        ["a {c}.", "a photo of a {c}."],
        batch_size=2,
        **kwargs,
    )
    assert head.shape[1] == 3
    return stream.getvalue()


def test_zeroshot_head_shows_progress_over_text_batches_on_a_terminal(testbed, monkeypatch):
    out = _head_output(testbed, monkeypatch, Terminal())
    assert "zero-shot head (3 classes x 2 templates)" in out
    assert "0/3 [" in out  # 6 prompts in batches of 2


@pytest.mark.parametrize(("stream", "progress"), [(Terminal(), False), (io.StringIO(), True)])
def test_zeroshot_head_is_quiet_when_off_or_not_a_terminal(testbed, monkeypatch, stream, progress):
    assert _head_output(testbed, monkeypatch, stream, progress=progress) == ""


def test_demo_config_enables_progress():
    assert yaml.safe_load(DEMO_CONFIG.read_text())["trainer"]["enable_progress_bar"] is True


@pytest.mark.parametrize("enabled", [True, False])
def test_demo_config_run_shows_search_and_head_progress(tmp_path, monkeypatch, capsys, enabled):
    """The demo config (a one-configuration grid) draws the search's and the zero-shot heads' bars, or none."""
    from regcache.lightning_cli import main as validate_main

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    args = ["--config", str(DEMO_CONFIG), f"--model.run_dir={tmp_path / 'run'}", "--model.fidelity=false"]
    args += ["--trainer.callbacks.init_args.taus=[1]", "--trainer.callbacks.init_args.delete_ks=[0,1]"]
    args += ["--trainer.callbacks.init_args.num_candidates=1"]
    if not enabled:
        args += ["--trainer.enable_progress_bar=false"]
    assert validate_main(args) == 0
    out = terminal.getvalue() + capsys.readouterr().out
    for bar in ("register search", "zero-shot head (10 classes", "sensitivity sweep"):
        assert (bar in out) is enabled, bar
