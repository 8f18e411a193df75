"""Calibration time of each base PTQ method on a ViT-B/16-shaped model (random weights, random images).

Workload 2 of the benchmark suite: PTQ4ViT, RepQ-ViT and naive on 32 images, NoisyQuant on 1,024
(the paper's sizes), W8A8 and W6A6. One GPU; fp32 model (calibration statistics and PTQ4ViT's
gradients in full precision).

    python benchmarks/bench_calibration.py [--model openclip-b16] [--methods naive repq_vit ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import VISION_MODELS, peak_memory_gib, reset_peak_memory, sync, vision_encoder, write_results

from regcache.quant import METHODS, calibrate_, quantize_

CALIBRATION_IMAGES = {"naive": 32, "ptq4vit": 32, "repq_vit": 32, "noisyquant": 1024}


def main() -> None:
    """Time quantize_ + calibrate_ per method and print the table last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="openclip-b16")
    ap.add_argument("--methods", nargs="*", default=[m for m in CALIBRATION_IMAGES if m in METHODS])
    ap.add_argument("--bits", nargs="*", type=int, default=[8, 6])
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = VISION_MODELS[args.model][1]
    rows = []
    for method in args.methods:
        for bits in args.bits:
            n = CALIBRATION_IMAGES.get(method, 32)
            g = torch.Generator().manual_seed(0)
            batches = [
                torch.randn(min(args.batch, n - i), 3, size, size, generator=g).to(device)
                for i in range(0, n, args.batch)
            ]
            encoder, _ = vision_encoder(args.model, device, torch.float32)
            reset_peak_memory()
            sync()
            start = time.perf_counter()
            quantize_(encoder, METHODS[method](w_bits=bits, a_bits=bits))
            calibrate_(encoder, batches, progress=False)
            sync()
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "model": args.model,
                    "method": method,
                    "bits": f"W{bits}A{bits}",
                    "images": n,
                    "seconds": seconds,
                    "peak_gib": peak_memory_gib(),
                }
            )
            print(rows[-1], flush=True)
            del encoder, batches
    write_results(f"calibration_{args.model}", rows, ["model", "method", "bits", "images", "seconds", "peak_gib"])


if __name__ == "__main__":
    main()
