"""``regcache report RUN_DIR...``: several runs' metrics.json as one paper-style Markdown table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_METRICS = ("zeroshot_top1", "image_retrieval_recall@1", "text_retrieval_recall@1", "knn_top1")


def load_runs(paths: list[str | Path]) -> list[dict[str, Any]]:
    """metrics.json of each run directory (or file)."""
    runs = []
    for p in map(Path, paths):
        f = p / "metrics.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"no metrics.json at {f}: pass run directories written by `regcache validate`")
        runs.append(json.loads(f.read_text()))
    return runs


def _bits(run: dict[str, Any]) -> str:
    return "FP" if run.get("method") in (None, "float") else f"W{run['w_bits']}A{run['a_bits']}"


def _regcache(run: dict[str, Any]) -> str:
    rc = run.get("regcache")
    if not rc:
        return "–"
    if rc.get("mode") == "base":  # the search installed nothing: the row holds the base method's numbers
        return f"base (nothing installed), l_q={rc.get('l_q')}"
    cell = f"l_q={rc.get('l_q')}, τ={rc.get('tau')}, k̃={rc.get('k_delete')}"
    modes = rc.get("modes")
    if modes and sorted(modes) != ["both", "prefix"]:  # an ablation: name what was searched
        cell = f"modes {'/'.join(modes)}: {cell}"
    return cell


def _method(run: dict[str, Any]) -> str:
    """The method, with the mixed-precision plan's base, kept blocks and their FLOP share."""
    method = str(run.get("method"))
    summary = (run.get("calibration") or {}).get("summary") or {}
    options = run.get("method_options") or {}
    if method != "mixed" or "blocks" not in summary:
        return method
    kept = "float" if summary.get("keep_bits") is None else f"{summary['keep_bits']}-bit"
    blocks = ", ".join(map(str, summary["blocks"]))
    return f"mixed ({options.get('base')}; blocks {blocks} {kept}, {100 * summary['flop_share']:.0f} % of FLOPs)"


def _reused(run: dict[str, Any]) -> str:
    """Which artifacts the run reused (``register_search``, ``calibration``) instead of computing them."""
    kinds = [a["kind"].replace("_", " ") for a in run.get("artifacts") or [] if a.get("reused")]
    return ", ".join(kinds) if kinds else "–"


def table(runs: list[dict[str, Any]], metrics: tuple[str, ...] = DEFAULT_METRICS) -> str:
    """Rows: runs (model, bits, method, RegCache, the artifacts it reused); columns: ``<dataset>/<metric>``
    present in any run, in %."""
    columns = sorted({k for r in runs for k in r.get("metrics", {}) if k.split("/", 1)[-1] in metrics})
    head = ["model", "bits", "method", "RegCache", "reused", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(runs, key=lambda r: (r.get("model", ""), _bits(r), r.get("method", ""), bool(r.get("regcache")))):
        cells = [str(r.get("model")), _bits(r), _method(r), _regcache(r), _reused(r)]
        cells += [f"{100 * r['metrics'][c]:.2f}" if c in r.get("metrics", {}) else "" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``regcache report``."""
    parser = argparse.ArgumentParser(prog="regcache report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (or metrics.json files)")
    parser.add_argument("--metrics", nargs="*", default=list(DEFAULT_METRICS), help="metric names to tabulate")
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    text = table(load_runs(args.runs), tuple(args.metrics))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0
