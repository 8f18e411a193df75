"""The register-search benchmark script runs end to end with --tiny (CPU) and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_register_search.py"


def test_bench_tiny_runs(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_register_search", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    args = ["--tiny", "--model", "regcache-tiny-openclip", "--reference", "8", "--pool", "8", "--calibration", "4"]
    args += ["--taus", "1,3", "--ks", "1"]
    monkeypatch.setattr(sys, "argv", ["bench", *args, "--loop-configs", "2", "--out", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    assert result["search_grid"]["configs"] == 1 + 2 * 2 * 1  # base + candidates x taus x k~
    assert result["naive_loop_configs"] == 2
    assert result["max_abs_score_diff_cached_vs_loop"] < 1e-5
    assert "| speed-up per configuration" in capsys.readouterr().out
