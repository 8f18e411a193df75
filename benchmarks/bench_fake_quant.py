"""Eager fake quantization: the fused one-kernel CUDA path vs the op-by-op formula, and bit-identity.

Tensors of ViT-B/16 at batch 256 (bf16): attention probabilities (256, 12, 197, 197), fc2 input
(256, 197, 3072), a qkv weight per output channel, a weight per group of 64.

    python benchmarks/bench_fake_quant.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_fn, write_results

from regcache.quant import UniformQuantizer


def main() -> None:
    """Time both paths on each tensor and print the table last."""
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = torch.bfloat16
    cases = [
        ("attn probs, per tensor, asym", torch.rand(256, 12, 197, 197, generator=g, device="cuda", dtype=bf) ** 4, {}),
        (
            "attn probs (permuted view), per tensor",
            torch.rand(256, 197, 12, 197, generator=g, device="cuda", dtype=bf).transpose(1, 2),
            {},
        ),
        ("fc2 input, per tensor, asym", torch.randn(256, 197, 3072, generator=g, device="cuda", dtype=bf), {}),
        ("fc2 input fp32, per tensor", torch.randn(256, 197, 3072, generator=g, device="cuda"), {}),
        (
            "qkv weight, per channel, sym",
            torch.randn(2304, 768, generator=g, device="cuda", dtype=bf),
            {"granularity": "channel", "symmetric": True},
        ),
        (
            "fc1 weight, per group 64, sym",
            torch.randn(3072, 768, generator=g, device="cuda", dtype=bf),
            {"granularity": "group", "group_size": 64, "symmetric": True},
        ),
    ]
    rows = []
    for name, x, kw in cases:
        kw = {"symmetric": False, **kw}
        q = UniformQuantizer(8, **kw).cuda().calibrate_(x)
        q.set_mode("quant")
        with torch.inference_mode():
            fused, plain = q.fake_quant(x), q.plain_fake_quant(x)
            identical = torch.equal(fused, plain)
            t_fused = time_fn(lambda q=q, x=x: q.fake_quant(x), warmup=3, repeats=20)
            t_plain = time_fn(lambda q=q, x=x: q.plain_fake_quant(x), warmup=3, repeats=20)
        rows.append(
            {
                "tensor": name,
                "shape": "x".join(map(str, x.shape)),
                "dtype": str(x.dtype).replace("torch.", ""),
                "plain_ms": 1000 * t_plain,
                "fused_ms": 1000 * t_fused,
                "speedup": t_plain / t_fused,
                "bit_identical": identical,
            }
        )
        print(rows[-1], flush=True)
        del x
    write_results("fake_quant", rows, list(rows[0]))
    if not all(r["bit_identical"] for r in rows):
        raise SystemExit("fused fake quantization is NOT bit-identical to the plain formula")


if __name__ == "__main__":
    main()
