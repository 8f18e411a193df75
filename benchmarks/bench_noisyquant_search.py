"""NoisyQuant's per-linear search alone (clip, then mean shift and amplitude of the noise), per precision.

Times ``search_clip_scale`` + ``search_noise`` on random inputs with outlier channels for the four
linear shapes of a ViT block (qkv, proj, fc1, fc2) and checks that every precision chooses the
float32 search's clip and noise. Faster to iterate on than the full calibration
(``bench_calibration.py``); the full ViT-B/16 calibration costs about 12x the ``total`` row.

    python benchmarks/bench_noisyquant_search.py [--precisions fp32 bf16x3 bf16x2] [--tokens 8192 --width 768]

``REGCACHE_FUSED_NOISYQUANT=0`` turns the Triton kernels off (the op-by-op formula, for A/B timing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sync, write_results

from regcache.quant.methods.noisyquant import search_clip_scale, search_noise


def layer_inputs(tokens: int, c_in: int, c_out: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations with a few large channels (as in ViTs) and a weight fake-quantized to 8 bits per channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, c_in, generator=g) * torch.exp(torch.randn(c_in, generator=g) * 0.5)
    x[:, :2] *= 20
    w = torch.randn(c_out, c_in, generator=g) / c_in**0.5
    step = w.abs().amax(dim=1, keepdim=True) / 127
    return x.to(device), (torch.round(w / step) * step).to(device)


def search(x, w, bits, args, precision: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen (clip step, noise) of one linear."""
    scale = search_clip_scale(x, w, bits, x.abs().max(), args.clip_candidates, args.chunk_elements, precision=precision)
    base = (torch.rand(x.shape[1], generator=torch.Generator().manual_seed(seed)).to(x.device) * 2 - 1) * scale
    noise = search_noise(
        x,
        w,
        bits,
        scale,
        base,
        args.mean_candidates,
        args.amplitude_candidates,
        budget=args.chunk_elements,
        precision=precision,
    )
    return scale, noise


def main() -> None:
    """Time each precision per linear shape; print the table last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16x3", "bf16x2"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--width", type=int, default=768, help="model width (MLP hidden = 4x)")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--clip-candidates", type=int, default=1000)
    ap.add_argument("--mean-candidates", type=int, default=400)
    ap.add_argument("--amplitude-candidates", type=int, default=2000)
    ap.add_argument("--chunk-elements", type=int, default=1 << 26)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d = args.width
    shapes = {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}
    rows = []
    for i, (name, (c_in, c_out)) in enumerate(shapes.items()):
        x, w = layer_inputs(args.tokens, c_in, c_out, device, i)
        chosen = {}
        for precision in args.precisions:
            search(x[:64], w, args.bits, args, precision, i)  # warm-up: kernel compilation, cuBLAS handles
            sync()
            start = time.perf_counter()
            chosen[precision] = search(x, w, args.bits, args, precision, i)
            sync()
            rows.append({"linear": name, "precision": precision, "seconds": time.perf_counter() - start})
        ref = chosen.get("fp32")
        for row in rows[-len(args.precisions) :]:
            s, n = chosen[row["precision"]]
            row["same_as_fp32"] = "-" if ref is None else bool(torch.equal(s, ref[0]) and torch.equal(n, ref[1]))
        print(rows[-len(args.precisions) :], flush=True)
    for precision in args.precisions:
        total = sum(r["seconds"] for r in rows if r["precision"] == precision)
        rows.append({"linear": "total", "precision": precision, "seconds": total, "same_as_fp32": ""})
    write_results(
        f"noisyquant_search_t{args.tokens}_d{args.width}",
        rows,
        ["linear", "precision", "seconds", "same_as_fp32"],
        {"tokens": args.tokens, "width": args.width, "bits": args.bits},
    )


if __name__ == "__main__":
    main()
