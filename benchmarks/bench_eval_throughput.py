"""Quantized evaluation throughput vs the float model, eager and compiled, with and without RegCache.

Workloads 3 and 5 of the benchmark suite: images/s of each method at each bit width at batch 256
as a ratio of the float model measured in the same run, the latency overhead of the RegCache
prefix + token deletion with the same quantizer, and peak GPU memory. Random weights (speed does
not depend on their values), random (non-zero) images.

    python benchmarks/bench_eval_throughput.py [--model openclip-b16] [--methods naive repq_vit ...]
        [--bits 8 6] [--compile blocks|model|none] [--budget-s 210]

What is timed and how:

- Calibration is shortened (``--calib-images`` random images, PTQ4ViT with 1 search round and a
  coarse grid, NoisyQuant with few candidates on few tokens): the quantizers, their kinds and
  their placement are the method's, only their values are less searched, and throughput does not
  depend on the values. Calibration runs in float32; the model's parameters are then cast to the
  evaluation dtype (quantizer parameters stay float32, as fake quantization computes in float32).
- RegCache (random register K/V, τ = 4, on blocks >= L/2; top-4 deletion at L/2) is installed on
  the same calibrated model for the "prefix + deletion" rows.
- All eager rows run first. Compiled rows follow in priority order (float, then each method at
  its first bit width, then the other widths) while the time spent stays within ``--budget-s``
  (compile time counts): a compiled variant is skipped, and listed as skipped, when the last
  compile + timing suggests it would overrun. ``--compile blocks`` (default) compiles each block
  (``torch.compile``, default mode, static shapes; blocks with the same structure share one
  compiled graph, so compile time is a few graphs, not a whole unrolled model); ``model``
  compiles the whole encoder (as BENCHMARKS.md section 3 did; slower to compile).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import VISION_MODELS, peak_memory_gib, reset_peak_memory, sync, time_fn, vision_encoder, write_results

from regcache.encoders import AttentionPrefix
from regcache.quant import METHODS, Quantizer, calibrate_, quantize_
from regcache.registers import install_deletion, remove_deletion, remove_prefix

ALL_METHODS = ("naive", "repq_vit", "ptq4vit", "noisyquant")
# Shortened searches: same quantizers, less searched values (throughput does not depend on them).
FAST_CALIBRATION = {
    "ptq4vit": {"search_rounds": 1, "eq_n": 8, "softmax_splits": 4},
    "noisyquant": {"clip_candidates": 20, "mean_candidates": 8, "amplitude_candidates": 8, "search_tokens": 1024},
}


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
            multiplicity=(tau,),
        )
    install_deletion(encoder, l_q, k_delete)


def set_regcache(encoder, on: bool) -> None:
    """Install (on) or remove RegCache."""
    remove_prefix(encoder)
    remove_deletion(encoder)
    if on:
        install_random_regcache(encoder, encoder.num_blocks // 2)


def bits_label(method: str, bits: int) -> str:
    """The rows' bit-width label: 'float' or 'W8A8'."""
    return "float" if method == "float" else f"W{bits}A{bits}"


def paired_overhead(encoder, fn, images: torch.Tensor, pairs: int, calls: int = 3) -> float:
    """RegCache's latency overhead in %: median over interleaved pairs of (time with / time without) - 1.

    Both states run back to back in each pair (order alternating), so clock and thermal drift over
    the run cancels in each ratio, unlike two medians taken a minute apart.
    """
    ratios = []
    with torch.inference_mode():
        for on in (False, True):  # both states warm (compiled: both graphs built) before timing
            set_regcache(encoder, on)
            fn(images)
            fn(images)
        for i in range(pairs):
            elapsed = {}
            for on in (False, True) if i % 2 == 0 else (True, False):
                set_regcache(encoder, on)
                sync()
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(images)
                sync()
                elapsed[on] = time.perf_counter() - t0
            ratios.append(elapsed[True] / elapsed[False])
    return 100 * (statistics.median(ratios) - 1)


def cast_model(encoder: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast every parameter and buffer except the quantizers' (they stay float32); shared ones stay shared."""
    memo: dict[int, torch.Tensor] = {}
    for module in encoder.modules():
        if isinstance(module, Quantizer):
            continue
        for store in (module._parameters, module._buffers):
            for name, t in list(store.items()):
                if t is None or not t.is_floating_point() or t.dtype == dtype:
                    continue
                if id(t) not in memo:
                    with torch.no_grad():
                        new = t.to(dtype)
                    is_param = isinstance(t, torch.nn.Parameter)
                    memo[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
                store[name] = memo[id(t)]


def build(model: str, method: str, bits: int, device: str, dtype, calib: list[torch.Tensor]) -> torch.nn.Module:
    """Adapted encoder with the method calibrated (shortened search, float32), then cast to dtype."""
    if method == "float":
        return vision_encoder(model, device, dtype)[0]
    encoder, _ = vision_encoder(model, device, torch.float32)
    quantize_(encoder, METHODS[method](w_bits=bits, a_bits=bits, **FAST_CALIBRATION.get(method, {})))
    calibrate_(encoder, [c.float() for c in calib], progress=False)
    cast_model(encoder, dtype)
    return encoder


def regional(encoder) -> callable:
    """embed → each block compiled (blocks of the same structure share a graph) → pool."""
    blocks = [torch.compile(b, dynamic=False) for b in encoder.blocks]

    def run(images):
        x = encoder.embed(images)
        for b in blocks:
            x = b(x)
        return encoder.pool(x)

    return run


def main() -> None:
    """Run the benchmark and print its table last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="openclip-b16")
    ap.add_argument("--methods", nargs="*", default=list(ALL_METHODS))
    ap.add_argument("--bits", nargs="*", type=int, default=[8, 6])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--compile", choices=["blocks", "model", "none"], default="blocks")
    ap.add_argument("--no-compile", action="store_true", help="same as --compile none")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop adding compiled rows past this (seconds)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=15, help="interleaved with / without RegCache pairs (overhead)")
    ap.add_argument("--calib-images", type=int, default=16)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None, help="default bf16 on GPU, fp32 on CPU")
    args = ap.parse_args()
    start = time.perf_counter()
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):  # one graph per block structure and shape, never an eager fallback
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    compile_kind = "none" if args.no_compile else args.compile
    size = VISION_MODELS[args.model][1]
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, generator=g).to(device, dtype)
    calib = [torch.randn(args.calib_images, 3, size, size, generator=g).to(device)]

    variants = [("float", 16)] + [(m, b) for m in args.methods for b in args.bits]
    models, rows, baseline, calib_s, paired = {}, [], {}, {}, {}

    def measure(method, bits, rc, mode, fn):
        reset_peak_memory()
        with torch.inference_mode():
            t0 = time.perf_counter()
            fn(images)  # first call: compiles when compiled
            first = time.perf_counter() - t0
            seconds = time_fn(lambda: fn(images), warmup=2, repeats=args.repeats)
        ips = args.batch / seconds
        if method == "float" and not rc:
            baseline[mode] = ips
        rows.append(
            {
                "model": args.model,
                "method": method,
                "bits": bits_label(method, bits),
                "regcache": "prefix + deletion" if rc else "-",
                "mode": mode,
                "images_per_s": ips,
                "ratio_to_float": ips / baseline[mode] if mode in baseline else float("nan"),
                "latency_ms": 1000 * seconds,
                "peak_gib": peak_memory_gib(),
                "first_call_s": first,
                "calib_s": calib_s.get((method, bits), 0.0),
            }
        )
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)

    # ---- eager: every variant, without and with RegCache
    for method, bits in variants:
        t0 = time.perf_counter()
        try:
            models[(method, bits)] = build(args.model, method, bits, device, dtype, calib)
        except Exception as exc:  # keep measuring the others; the failure is reported
            label = bits_label(method, bits)
            print(f"!! {method} {label}: build/calibration failed: {exc!r}", flush=True)
            rows.append({"model": args.model, "method": method, "bits": label, "mode": f"failed: {exc}"})
            continue
        calib_s[(method, bits)] = time.perf_counter() - t0
        for rc in (False, True):
            set_regcache(models[(method, bits)], rc)
            measure(method, bits, rc, "eager", models[(method, bits)])
        enc = models[(method, bits)]
        paired[(method, bits_label(method, bits), "eager")] = paired_overhead(enc, enc, images, args.pairs)

    # ---- compiled, in priority order, within the time budget
    if compile_kind != "none":
        first_bits = [(m, args.bits[0]) for m in args.methods]
        other_bits = [(m, b) for m in args.methods for b in args.bits[1:]]
        last_cost = 0.0
        mode = f"compiled ({compile_kind})"
        for method, bits in [("float", 16), *first_bits, *other_bits]:
            encoder = models.get((method, bits))
            if encoder is None:
                continue
            for rc in (False, True):
                label = f"{method} {bits_label(method, bits)} rc={rc}"
                if time.perf_counter() - start + last_cost > args.budget_s:
                    print(f"-- skipped compiled {label}: time budget {args.budget_s:.0f} s", flush=True)
                    rows.append(
                        {
                            "model": args.model,
                            "method": method,
                            "bits": bits_label(method, bits),
                            "regcache": "prefix + deletion" if rc else "-",
                            "mode": "compiled: skipped (budget)",
                        }
                    )
                    continue
                t0 = time.perf_counter()
                set_regcache(encoder, rc)
                torch._dynamo.reset()
                fn = regional(encoder) if compile_kind == "blocks" else torch.compile(encoder)
                measure(method, bits, rc, mode, fn)
                if rc:  # both states measured: the paired overhead, on the same compiled function
                    paired[(method, bits_label(method, bits), mode)] = paired_overhead(encoder, fn, images, args.pairs)
                last_cost = time.perf_counter() - t0
            models.pop((method, bits), None)  # free it
            torch._dynamo.reset()

    # RegCache overhead: same quantizer with vs without the prefix + deletion
    latency = {(r["method"], r["bits"], r["mode"], r.get("regcache")): r.get("latency_ms") for r in rows}
    for row in rows:
        plain = latency.get((row["method"], row["bits"], row["mode"], "-"))
        if row.get("regcache") == "prefix + deletion" and plain and row.get("latency_ms"):
            row["regcache_overhead_pct"] = 100 * (row["latency_ms"] / plain - 1)
        key = (row["method"], row["bits"], row["mode"])
        if row.get("regcache") == "prefix + deletion" and key in paired:
            row["regcache_overhead_paired_pct"] = paired[key]
    order = {"float": -1, **{m: i for i, m in enumerate(ALL_METHODS)}}
    rows.sort(key=lambda r: (order.get(r["method"], 99), r["bits"] != "W8A8", r["bits"], r["mode"] != "eager"))
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
            "regcache_overhead_paired_pct",
            "latency_ms",
            "peak_gib",
            "first_call_s",
        ],
        {
            "batch": args.batch,
            "dtype": str(dtype),
            "compile": compile_kind,
            "calibration": f"shortened, {args.calib_images} images: {FAST_CALIBRATION}",
            "total_s": time.perf_counter() - start,
        },
    )
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
