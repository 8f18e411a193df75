"""Calibration time of each base PTQ method on a ViT-B/16-shaped model (random weights, random images).

Workload 2 of the benchmark suite: PTQ4ViT, RepQ-ViT and naive on 32 images, NoisyQuant on 1,024
(the paper's sizes), W8A8 and W6A6. One GPU; fp32 model (calibration statistics and PTQ4ViT's
gradients in full precision).

    python benchmarks/bench_calibration.py [--model openclip-b16] [--methods naive repq_vit ...]

NoisyQuant's search runs in ``--noisyquant-precision`` (default ``auto``: bf16x2 on CUDA, integer codes
times B_hi + B_lo in bfloat16 tensor-core matmuls, with fused Triton kernels; ``bf16x3`` is the previous
default; ``REGCACHE_FUSED_NOISYQUANT=0`` turns the kernels off, i.e. the op-by-op search of before);
``--check-blocks N`` then calibrates the model cut to its first N blocks twice, with that
precision and with the float32 search, and reports how many linears got the same clip scale and
noise (column ``same_as_fp32``; not included in ``seconds``).
"""

from __future__ import annotations

import argparse
import copy
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
    ap.add_argument("--noisyquant-precision", default="auto", choices=["auto", "fp32", "bf16x3", "bf16x2", "bf16"])
    ap.add_argument("--check-blocks", type=int, default=0, help="NoisyQuant: compare N blocks with the fp32 search")
    ap.add_argument(
        "--noisyquant-chunk-elements",
        type=int,
        default=None,
        help="NoisyQuant: search_chunk_elements (default: config's); candidates per matmul = this / (T·max(W.shape))",
    )
    ap.add_argument(
        "--matmul-precision",
        default="highest",
        choices=["highest", "high"],
        help="torch.set_float32_matmul_precision for the model's float32 forwards: highest (full float32, "
        "plain-Python calibrate_'s default) or high (TF32: what the Lightning module / CLI sets by default)",
    )
    args = ap.parse_args()
    torch.set_float32_matmul_precision(args.matmul_precision)
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
            check = method == "noisyquant" and args.check_blocks > 0
            float_copy = copy.deepcopy(encoder) if check else None  # weights are random: compare on the same ones
            reset_peak_memory()
            sync()
            start = time.perf_counter()
            extra = {}
            if method == "noisyquant":
                extra["search_precision"] = args.noisyquant_precision
                if args.noisyquant_chunk_elements:
                    extra["search_chunk_elements"] = args.noisyquant_chunk_elements
            quantize_(encoder, METHODS[method](w_bits=bits, a_bits=bits, **extra))
            calibrate_(encoder, batches, progress=False)
            sync()
            seconds = time.perf_counter() - start
            rows.append(
                {
                    "model": args.model,
                    "method": method,
                    "bits": f"W{bits}A{bits}",
                    "images": n,
                    "matmul_precision": args.matmul_precision,
                    "seconds": seconds,
                    "peak_gib": peak_memory_gib(),
                }
            )
            if check:
                rows[-1]["same_as_fp32"] = same_as_fp32(
                    float_copy, bits, batches, args.check_blocks, args.noisyquant_precision
                )
                del float_copy
            print(rows[-1], flush=True)
            del encoder, batches
    columns = ["model", "method", "bits", "images", "matmul_precision", "seconds", "peak_gib"]
    if any("same_as_fp32" in r for r in rows):
        columns.append("same_as_fp32")
    write_results(f"calibration_{args.model}", rows, columns)


def noisy_parameters(encoder) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(clip scale, noise) of every NoisyQuant linear, in module order."""
    from regcache.quant.methods.noisyquant import NoisyQuantLinear

    return [(m.input_quantizer.scale, m.noise) for m in encoder.modules() if isinstance(m, NoisyQuantLinear)]


def same_as_fp32(float_encoder, bits: int, batches, blocks: int, precision: str) -> str:
    """'k/n': linears of the first ``blocks`` blocks calibrated alike with ``precision`` and the float32 search.

    Both runs use the same truncated copy (the token samples' RNG runs over all blocks in the clip
    phase first, so a truncated run must be compared with a truncated run).
    """
    del float_encoder.blocks[blocks:]
    chosen = []
    for p in (precision, "fp32"):
        encoder = copy.deepcopy(float_encoder)
        quantize_(encoder, METHODS["noisyquant"](w_bits=bits, a_bits=bits, search_precision=p))
        calibrate_(encoder, batches, progress=False)
        chosen.append(noisy_parameters(encoder))
    same = sum(torch.equal(s, rs) and torch.equal(n, rn) for (s, n), (rs, rn) in zip(*chosen, strict=True))
    return f"{same}/{len(chosen[1])}"


if __name__ == "__main__":
    main()
