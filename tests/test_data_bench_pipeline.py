"""The input-pipeline benchmark runs end to end with --tiny (CPU): every row, the validate budget, its JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_input_pipeline.py"


def test_bench_tiny_runs_every_path_and_stops_validate_at_the_budget(tmp_path, monkeypatch, single_thread):
    spec = importlib.util.spec_from_file_location("bench_input_pipeline", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["bench", "--tiny", "--validate-budget-s", "0", "--watchdog-s", "0"])
    bench.main()
    result = json.loads((tmp_path / "input_pipeline_tiny.json").read_text())
    meta, rows = result["meta"], result["rows"]
    assert meta["grouped_vs_per_image_max_abs_diff"] == 0.0 and meta["gpu_vs_cpu_mean_abs_diff"] < 0.03
    models = {r["model"] for r in rows}
    assert models == {"-", bench.FLOAT, bench.QUANT}
    validate = [r for r in rows if "trainer.validate" in r["path"]]
    assert len(validate) == 5 and {r["model"] for r in validate} == {bench.FLOAT, bench.QUANT}
    # budget 0: each run stops at its second batch (the first is start-up, never cut)
    assert all(r["stopped_by_budget"] and r["images"] == 2 * meta["batch"] for r in validate)
    assert all(r["images_per_s"] > 0 and r["ratio_to_model"] > 0 for r in rows)
