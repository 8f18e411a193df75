"""QDrop reconstruction time of an open_clip ViT-B/16 visual tower at W4A4 (random weights, synthetic images).

The recipe's sizes: 1,024 calibration images, 20,000 steps of batch 32 per block, the ``mse`` init;
bf16 autocast (``--no-amp``: float32). One command must end within minutes, so ``--budget-s`` stops
where one more block would end past it: the blocks done are measured, the rest of the 12 is projected
from the mean of the measured blocks after the first (which carries the warm-up; all of them if only
one block ran). Peak memory is ``torch.cuda.max_memory_allocated`` over the whole run.

    python benchmarks/bench_qdrop.py [--iterations 20000] [--images 1024] [--budget-s 330] [--no-amp]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_memory_gib, reset_peak_memory, sync, vision_encoder, write_results

from regcache.quant import quantize_
from regcache.quant.methods.qdrop import QDropConfig


def main() -> None:
    """Quantize, reconstruct within the budget, print the measured and projected times last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="openclip-b16")
    ap.add_argument("--iterations", type=int, default=20000)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (--no-amp) on the tensor cores
    reset_peak_memory()
    encoder, size = vision_encoder(args.model, device=args.device, dtype=torch.float32)
    config = QDropConfig(
        w_bits=4, a_bits=4, iterations=args.iterations, batch_size=args.batch_size, amp=not args.no_amp
    )
    g = torch.Generator(device=args.device).manual_seed(0)
    images = torch.randn(args.images, 3, size, size, generator=g, device=args.device)
    start = time.perf_counter()
    quantize_(encoder, config)
    with torch.no_grad():  # the mse init of the weights, as calibrate runs it before the blocks
        from regcache.quant.methods.qdrop import mse_calibrate_
        from regcache.quant.modules import QuantLinear

        for layer in encoder.modules():
            if isinstance(layer, QuantLinear) and layer.weight_quantizer is not None:
                mse_calibrate_(layer.weight_quantizer, layer.weight)
    sync()
    weight_init_s = time.perf_counter() - start
    stats = config.reconstruct(encoder, images, progress=False, budget_s=args.budget_s)
    blocks = stats["blocks"]
    seconds = [row["seconds"] for row in blocks.values()]
    steady = seconds[1:] or seconds
    per_block = sum(steady) / len(steady)
    n = encoder.num_blocks
    projected = weight_init_s + stats["setup_s"] + seconds[0] + per_block * (n - 1)
    rows = [
        {"block": int(k), "seconds": row["seconds"], "final_loss": row["final_loss"], "measured": True}
        for k, row in blocks.items()
    ]
    extra = {
        "commit_env": os.environ.get("GIT_COMMIT"),
        "iterations": args.iterations,
        "images": args.images,
        "batch_size": args.batch_size,
        "amp_bf16": not args.no_amp,
        "weight_init_s": weight_init_s,
        "setup_s": stats["setup_s"],
        "blocks_measured": len(blocks),
        "per_block_s": per_block,
        "ms_per_step": 1000 * per_block / max(args.iterations, 1),
        "projected_total_s": projected,
        "measured_s": weight_init_s + stats["total_s"],
        "peak_memory_gib": peak_memory_gib(),
    }
    write_results("qdrop_vit_b16_w4a4", rows, ["block", "seconds", "final_loss", "measured"], extra)
    for key in ("blocks_measured", "weight_init_s", "setup_s", "per_block_s", "ms_per_step", "peak_memory_gib"):
        print(f"{key}: {extra[key]:.3f}" if isinstance(extra[key], float) else f"{key}: {extra[key]}")
    print(f"measured ({len(blocks)} of {n} blocks): {extra['measured_s']:.1f} s")
    print(
        f"projected total ({n} blocks, from the measured per-block time): {projected:.1f} s = {projected / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
