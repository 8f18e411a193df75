"""``regcache demo``: the pipeline on the embedded default model, on CPU, in seconds.

Until the outlier testbed ships, the embedded default is ``regcache-tiny-vit`` with random
weights: the run shows the plumbing (load → adapt → naive calibration at several bit widths →
fidelity to the float model), not accuracy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from regcache.encoders import adapt
from regcache.loading import load_model
from regcache.quant import NaiveConfig, calibrate_, quant_mode, quantize_
from regcache.utils import write_json

DEFAULT_MODEL = "regcache-tiny-vit"


def _table(rows: list[dict]) -> str:
    lines = ["| name | method | W | A | cosine to float | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['method']} | {r['w_bits']} | {r['a_bits']} | "
            f"{r['cosine_to_float']:.4f} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def run_demo(out_dir: str | Path = "demo", seed: int = 0, num_images: int = 32) -> Path:
    """Quantize the embedded default at W8A8 / W6A6 / W4A4 and write ``results.json`` + ``results.md``."""
    torch.manual_seed(seed)
    out = Path(out_dir)
    g = torch.Generator().manual_seed(seed)
    size = 64
    calib = [torch.randn(8, 3, size, size, generator=g) for _ in range(4)]
    evaluation = torch.randn(num_images, 3, size, size, generator=g)
    rows = []
    for w, a in ((8, 8), (6, 6), (4, 4)):
        start = time.perf_counter()
        torch.manual_seed(seed)
        encoder = adapt(load_model(DEFAULT_MODEL).model)
        quantize_(encoder, NaiveConfig(w_bits=w, a_bits=a))
        calibrate_(encoder, calib, progress=False)
        with torch.no_grad():
            q = encoder(evaluation)
            with quant_mode(encoder, "float"):
                f = encoder(evaluation)
        rows.append(
            {
                "name": f"naive W{w}A{a}",
                "method": "naive",
                "w_bits": w,
                "a_bits": a,
                "regcache": None,
                "cosine_to_float": F.cosine_similarity(q, f, dim=-1).mean().item(),
                "seconds": time.perf_counter() - start,
            }
        )
    table = _table(rows)
    print(f"model: {DEFAULT_MODEL} (random weights: a plumbing check, not an accuracy result)\n")
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    return write_json(out / "results.json", {"model": DEFAULT_MODEL, "pretrained": None, "rows": rows})


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``regcache demo``."""
    parser = argparse.ArgumentParser(prog="regcache demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="output directory (default: ./demo)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = run_demo(args.out, seed=args.seed)
    print(f"results: {path}")
    return 0
