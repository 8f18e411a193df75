"""QDrop reconstruction time of an open_clip ViT-B/16 visual tower at W4A4 (random weights, synthetic images).

One command, two parts (1,024 calibration images, batch 32, the ``mse`` init, bf16 autocast):

1. per-step time on block 0, eager loop against the optimized CUDA loop (``qdrop.FAST_STEP_DEVICES``:
   the forward and loss compiled by ``torch.compile``, masks drawn outside the graph, no host sync):
   ``--step-iterations`` steps each (600), timed from step 101 to the end (500 steps after warm-up and
   compilation), the regulariser on from the first step (``warmup=0``: the heavier of the two loss
   variants, which the recipe runs for 80 % of its steps); the compile overhead is the loop's time less
   its steps at the steady rate;
2. the optimized loop at the full recipe (20,000 steps per block, warmup 0.2) on a fresh tower for as
   many whole blocks as fit in ``--budget-s``: those blocks are measured, the rest of the 12 projected from
   the mean of the measured blocks after the first (all of them if one block ran). The process already
   compiled the step in part 1; a fresh process pays the part-1 compile overhead once more (added to the
   "cold" projection). Peak memory is ``torch.cuda.max_memory_allocated`` over both parts.

    python benchmarks/bench_qdrop.py [--iterations 20000] [--step-iterations 600] [--budget-s 110]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_memory_gib, reset_peak_memory, sync, vision_encoder, write_results

from regcache.quant import quantize_
from regcache.quant.methods import qdrop
from regcache.quant.methods.qdrop import QDropConfig, mse_calibrate_
from regcache.quant.modules import QuantLinear


def fresh_tower(args: argparse.Namespace, config: QDropConfig) -> tuple[torch.nn.Module, float]:
    """A quantized tower with the mse weight init done (as calibrate runs it before the blocks), and its seconds."""
    encoder, _ = vision_encoder(args.model, device=args.device, dtype=torch.float32)
    start = time.perf_counter()
    quantize_(encoder, config)
    with torch.no_grad():
        for layer in encoder.modules():
            if isinstance(layer, QuantLinear) and layer.weight_quantizer is not None:
                mse_calibrate_(layer.weight_quantizer, layer.weight)
    sync()
    return encoder, time.perf_counter() - start


def block0_step(encoder, images, config: QDropConfig, devices: tuple[str, ...]) -> dict:
    """Block 0's reconstruction row with the given fast-step device types (budget 0: block 0 only)."""
    qdrop.FAST_STEP_DEVICES = devices
    row = config.reconstruct(encoder, images, progress=False, budget_s=0.0)["blocks"]["0"]
    out = {k: row.get(k) for k in ("step", "loop_s", "steady_ms_per_step", "compile_warning", "final_loss")}
    out["overhead_s"] = row["loop_s"] - row["steady_ms_per_step"] * config.iterations / 1000
    print(json.dumps({"block0": out}), flush=True)
    return out


def main() -> None:
    """Part 1 (eager vs optimized per step), part 2 (full recipe within the budget), measured and projected."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="openclip-b16")
    ap.add_argument("--iterations", type=int, default=20000)
    ap.add_argument("--step-iterations", type=int, default=600)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--budget-s", type=float, default=110.0)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (--no-amp) on the tensor cores
    reset_peak_memory()
    config = QDropConfig(
        w_bits=4, a_bits=4, iterations=args.iterations, batch_size=args.batch_size, amp=not args.no_amp
    )
    g = torch.Generator(device=args.device).manual_seed(0)
    images = torch.randn(args.images, 3, 224, 224, generator=g, device=args.device)

    short = dataclasses.replace(config, iterations=args.step_iterations, warmup=0.0)
    encoder, _ = fresh_tower(args, config)
    eager = block0_step(encoder, images, short, ())
    fast = block0_step(encoder, images, short, ("cuda",))
    del encoder

    qdrop.FAST_STEP_DEVICES = ("cuda",)
    if fast["steady_ms_per_step"] * args.iterations / 1000 > args.budget_s:  # not one block would fit
        print(f"part 2 skipped: one block at {fast['steady_ms_per_step']:.2f} ms / step exceeds --budget-s", flush=True)
        return
    encoder, weight_init_s = fresh_tower(args, config)
    stats = config.reconstruct(encoder, images, progress=False, budget_s=args.budget_s)
    blocks = stats["blocks"]
    seconds = [row["seconds"] for row in blocks.values()]
    steady = seconds[1:] or seconds
    per_block = sum(steady) / len(steady)
    n = encoder.num_blocks
    projected = weight_init_s + stats["setup_s"] + seconds[0] + per_block * (n - 1)
    rows = [
        {
            "block": int(k),
            "seconds": row["seconds"],
            "loop_s": row["loop_s"],
            "ms_per_step": row.get("steady_ms_per_step"),
            "step": row["step"],
            "final_loss": row["final_loss"],
            "measured": True,
        }
        for k, row in blocks.items()
    ]
    extra = {
        "commit_env": os.environ.get("GIT_COMMIT"),
        "iterations": args.iterations,
        "images": args.images,
        "batch_size": args.batch_size,
        "amp_bf16": not args.no_amp,
        "eager_ms_per_step": eager["steady_ms_per_step"],
        "optimized_ms_per_step": fast["steady_ms_per_step"],
        "speedup": eager["steady_ms_per_step"] / fast["steady_ms_per_step"],
        "first_compile_overhead_s": fast["overhead_s"],
        "optimized_step": fast["step"],
        "compile_warning": fast["compile_warning"],
        "weight_init_s": weight_init_s,
        "setup_s": stats["setup_s"],
        "blocks_measured": len(blocks),
        "per_block_s": per_block,
        "recipe_ms_per_step": 1000 * per_block / max(args.iterations, 1),
        "measured_s": weight_init_s + stats["total_s"],
        "projected_total_s": projected,
        "projected_cold_total_s": projected + max(fast["overhead_s"], 0.0),
        "peak_memory_gib": peak_memory_gib(),
    }
    write_results(
        "qdrop_vit_b16_w4a4",
        rows,
        ["block", "seconds", "loop_s", "ms_per_step", "step", "final_loss", "measured"],
        extra,
    )
    for key, value in extra.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"measured ({len(blocks)} of {n} blocks, full recipe): {extra['measured_s']:.1f} s")
    print(
        f"projected total ({n} blocks, from the measured per-block time): {projected:.1f} s = {projected / 60:.1f} min"
        f" (a fresh process, first compile included: {extra['projected_cold_total_s'] / 60:.1f} min)"
    )


if __name__ == "__main__":
    main()
