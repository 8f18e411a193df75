"""Quantized evaluation throughput vs the float model, eager and compiled, with and without RegCache.

Workloads 3 and 5 of the benchmark suite: images/s of each method at W8A8 / W6A6 at batch 256
as a ratio of the float bf16 model measured in the same run, and the latency overhead of the
RegCache prefix + token deletion with the same quantizer. Random weights (speed does not
depend on their values), random (non-zero) images.

    python benchmarks/bench_eval_throughput.py [--model openclip-b16] [--methods naive ...]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import VISION_MODELS, peak_memory_gib, reset_peak_memory, time_fn, vision_encoder, write_results

from regcache.encoders import AttentionPrefix
from regcache.quant import METHODS, calibrate_, quantize_
from regcache.registers import install_deletion


def install_random_regcache(encoder, l_q: int, tau: int = 4, k_delete: int = 4) -> None:
    """A register prefix (random K/V, τ copies) on blocks ≥ l_q and top-k̃ deletion at l_q."""
    g = torch.Generator().manual_seed(0)
    p = next(encoder.parameters())
    for block in encoder.blocks[l_q:]:
        attn = block.attn
        shape = (1, attn.num_heads, 1, attn.head_dim)
        attn.prefix = AttentionPrefix(
            torch.randn(shape, generator=g).to(p.device, p.dtype),
            torch.randn(shape, generator=g).to(p.device, p.dtype),
            torch.full((1, 1, 1, 1), math.log(tau), device=p.device, dtype=p.dtype),
        )
    install_deletion(encoder, l_q, k_delete)


def build(model: str, method: str, bits: int, regcache: bool, device: str, dtype, calib) -> torch.nn.Module:
    """Adapted encoder with the method calibrated (and RegCache installed before calibration)."""
    encoder, _ = vision_encoder(model, device, dtype)
    if regcache:
        install_random_regcache(encoder, encoder.num_blocks // 2)
    if method != "float":
        quantize_(encoder, METHODS[method](w_bits=bits, a_bits=bits))
        calibrate_(encoder, calib, progress=False)
    return encoder


def main() -> None:
    """Run the benchmark and print its table last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="openclip-b16")
    ap.add_argument("--methods", nargs="*", default=["naive"])
    ap.add_argument("--bits", nargs="*", type=int, default=[8, 6])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    size = VISION_MODELS[args.model][1]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, generator=g).to(device, dtype)
    calib = [torch.randn(32, 3, size, size, generator=g).to(device, dtype)]
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    configs = [("float", 16, False), ("float", 16, True)]
    configs += [(m, b, rc) for m in args.methods for b in args.bits for rc in (False, True)]
    rows, baseline = [], {}
    for method, bits, rc in configs:
        encoder = build(args.model, method, bits, rc, device, dtype, calib)
        for mode in modes:
            fn = torch.compile(encoder) if mode == "compiled" else encoder
            reset_peak_memory()
            with torch.inference_mode():
                seconds = time_fn(lambda fn=fn: fn(images), warmup=3, repeats=args.repeats)
            ips = args.batch / seconds
            if method == "float" and not rc:
                baseline[mode] = ips
            rows.append(
                {
                    "model": args.model,
                    "method": method,
                    "bits": "bf16" if method == "float" else f"W{bits}A{bits}",
                    "regcache": rc,
                    "mode": mode,
                    "images_per_s": ips,
                    "ratio_to_float": ips / baseline[mode],
                    "latency_ms": 1000 * seconds,
                    "peak_gib": peak_memory_gib(),
                }
            )
        del encoder
        torch._dynamo.reset()
    # RegCache overhead: same quantizer with vs without the prefix + deletion
    latency = {(r["method"], r["bits"], r["mode"], r["regcache"]): r["latency_ms"] for r in rows}
    for row in rows:
        plain = latency[(row["method"], row["bits"], row["mode"], False)]
        row["regcache_overhead_pct"] = 100 * (row["latency_ms"] / plain - 1) if row["regcache"] else 0.0
    write_results(
        f"eval_throughput_{args.model}",
        rows,
        [
            "method",
            "bits",
            "regcache",
            "mode",
            "images_per_s",
            "ratio_to_float",
            "regcache_overhead_pct",
            "latency_ms",
            "peak_gib",
        ],
        {"batch": args.batch, "dtype": str(dtype)},
    )


if __name__ == "__main__":
    main()
