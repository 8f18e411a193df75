"""Deployed W8A8 on integer kernels against the compiled bf16 float model (ViT-B/16, batch 256, one GPU).

    GIT_COMMIT=$(git rev-parse --short HEAD) python benchmarks/bench_deploy.py [--tune [SHAPE ...]] [--batch 256]

In one run:

1. GEMMs alone at ViT-B/16's four shapes (M = batch x 197): bf16 ``F.linear`` (cuBLAS), ``torch._int_mm``
   (weight [N, K] passed transposed, its fast layout) and the triton backend's ``int8_linear`` with a plain
   epilogue and with the epilogue each shape has in the model (qkv: bf16 out; proj / fc2: + residual;
   fc1: GELU + requantization), as TOP/s; ``--tune`` first times every tile candidate per shape.
   Three activation buffers rotate so the A operand does not sit in L2 between calls.
2. The fused LayerNorm + quantization and the static quantization alone (GB/s over bytes read + written).
3. End to end, images/s, interleaved rounds (medians): (a) the float encoder in bf16 with each block
   ``torch.compile``d (default mode; SDPA flash attention), as BENCHMARKS.md section 3; (b) the naive
   W8A8 linear-only encoder (attention in bf16 SDPA; calibrated on random batches) through
   ``regcache.deploy.deploy_`` with the triton backend, eager; (b') the same integer kernels chained by
   hand with the residual adds folded into the proj / fc2 epilogues (what the deployed modules can reach);
   (c) (b) and (b') with RegCache: random register K/V (1 entry, τ 4) on blocks >= 6, top-4 deletion at 6,
   whose overhead is the median of interleaved with / without pairs. Cosine of each integer path's
   embeddings to the fake-quant (simulated) model's.
4. ``torch.profiler`` of (b) (and (a)): the kernels by CUDA time (``$OUT/profile_*.txt``).

Random weights and images (speed does not depend on their values). The commit comes from ``GIT_COMMIT``
(a device's checkout may be stale), else git.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import os
import statistics
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval_throughput import cast_model, install_random_regcache, regional
from common import commit, device_name, markdown_table, vision_encoder, write_results

from regcache.quant import NaiveConfig, calibrate_, quantize_
from regcache.registers import remove_deletion, remove_prefix

SHAPES = {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)}
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, tma)
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, kind); kind: regcache/deploy/_triton_int8.py
CANDIDATES = [
    (256, 128, 128, 8, 8, 3, 5),
    (256, 128, 128, 8, 8, 3, 3),
    (256, 128, 128, 8, 8, 3, 4),
    (128, 256, 128, 8, 8, 3, 4),
    (128, 256, 128, 8, 8, 3, 3),
    (128, 128, 128, 8, 8, 3, 1),
]
OUT = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
# a static scale as calibration leaves it (an arbitrary float32), not a round decimal whose products with
# bf16 values land on exact ties far more often than a calibrated scale's do
QS = 0.0217391


def bench_ms(fn) -> float:
    """Median ms of fn by CUDA events (triton.testing.do_bench)."""
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median")


def rotating(tensors):
    """A callable returning the next tensor of a fixed set, round robin."""
    it = itertools.cycle(tensors)
    return lambda: next(it)


# ---- 1. GEMMs --------------------------------------------------------------------------------------


def gemm_section(m: int, tune: list[str], shapes: list[str]) -> list[dict]:
    """TOP/s of bf16, _int_mm and the triton int8 GEMM (plain and with the model's epilogue) per shape."""
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name in shapes:
        n, k = SHAPES[name]
        rows.append(gemm_row(name, m, n, k, name in tune, g))
        print(rows[-1], flush=True)
    return rows


def gemm_row(name: str, m: int, n: int, k: int, tune: bool, g: torch.Generator) -> dict:
    """One shape's row of :func:`gemm_section`."""
    from regcache.deploy import _triton_int8 as ti

    flops = 2 * m * n * k
    xb = rotating([torch.randn(m, k, device="cuda", generator=g).bfloat16() for _ in range(3)])
    wb = torch.randn(n, k, device="cuda", generator=g).bfloat16()
    xq = rotating([torch.randint(-128, 128, (m, k), device="cuda", generator=g).to(torch.int8) for _ in range(3)])
    wq = torch.randint(-128, 128, (n, k), device="cuda", generator=g).to(torch.int8)
    alpha = torch.rand(n, device="cuda") * 1e-4
    beta = torch.randn(n, device="cuda")
    res = rotating([torch.randn(m, n, device="cuda", generator=g).bfloat16() for _ in range(3)])
    row = {"shape": f"{name} {m}x{n}x{k}"}
    row["bf16 TFLOP/s"] = flops / bench_ms(lambda: F.linear(xb(), wb)) / 1e9
    row["_int_mm TOP/s"] = flops / bench_ms(lambda: torch._int_mm(xq(), wq.t())) / 1e9
    heavy = name == "fc1"
    if heavy:
        epi, extra = "gelu + quant", {"activation": "gelu", "out_quant": (QS, -100, -128, 127)}
    elif name in ("proj", "fc2"):
        epi, extra = "+ residual", {"residual": None}
    else:
        epi, extra = "bf16 out", {}

    def model_epilogue(cfg):
        kw = {**extra, "residual": res()} if "residual" in extra else extra
        return ti.int8_linear(xq(), wq, alpha, beta, out_dtype=torch.bfloat16, config=cfg, **kw)

    cfg = ti.config_for(m, n, k, heavy)
    if tune:  # each candidate with the epilogue this shape has in the model
        timings = []
        for cand in CANDIDATES:
            try:
                t = bench_ms(lambda cand=cand: model_epilogue(cand))
            except Exception as exc:  # out of shared memory / registers for this tile: skip it
                print(f"  {name} {cand}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
                continue
            timings.append((t, cand))
            print(f"  {name} {cand}: {flops / t / 1e9:.0f} TOP/s", flush=True)
        cfg = min(timings)[1]
        ti.TUNED[(n, k, heavy)] = cfg  # the end-to-end section runs the picks
    row["int8 plain TOP/s"] = (
        flops / bench_ms(lambda: ti.int8_linear(xq(), wq, alpha, beta, out_dtype=torch.bfloat16, config=cfg)) / 1e9
    )
    row["epilogue"] = epi
    row["int8 model-epilogue TOP/s"] = flops / bench_ms(lambda: model_epilogue(cfg)) / 1e9
    row["int8 / bf16"] = row["int8 model-epilogue TOP/s"] / row["bf16 TFLOP/s"]
    row["config"] = str(cfg)
    return row


# ---- 2. the small kernels --------------------------------------------------------------------------


def small_kernels_section(m: int) -> list[dict]:
    """GB/s of the LayerNorm + quantization and the static quantization at the residual stream's size."""
    from regcache.deploy import _triton_int8 as ti

    c = 768
    x = rotating([torch.randn(m, c, device="cuda").bfloat16() for _ in range(3)])
    w, b = torch.randn(c, device="cuda").bfloat16(), torch.randn(c, device="cuda").bfloat16()
    nbytes = m * c * (2 + 1)
    rows, best = [], []
    for kernel, per in (("block", 1), ("warp", 1), ("warp", 2), ("warp", 4), ("warp", 8)):
        try:
            t = bench_ms(
                lambda kernel=kernel, per=per: ti.layernorm_quantize(
                    x(), w, b, 1e-5, QS, -3, -128, 127, rows_per_program=per, kernel=kernel
                )
            )
        except Exception as exc:  # a variant that does not build here: report it, keep the others
            print(f"  layernorm_quantize {kernel} rows={per}: {type(exc).__name__}: {exc}", flush=True)
            continue
        label = f"layernorm_quantize bf16 -> int8, {kernel} kernel, {per} row(s) a program"
        rows.append({"kernel": label, "ms": t, "GB/s": nbytes / t / 1e6})
        best.append((t, kernel, per))
    _, ti.LN_KERNEL, ti.LN_ROWS = min(best)  # the end-to-end section runs the fastest
    print(f"layernorm_quantize: {ti.LN_KERNEL} kernel, {ti.LN_ROWS} row(s) a program end to end", flush=True)
    # fc1's GELU + requantization pass over [M, 3072] bf16 (config kind 5's second pass)
    n4 = 4 * c
    ys = rotating([(torch.randn(m, n4, device="cuda") * 1.5).bfloat16() for _ in range(2)])
    act_bytes = m * n4 * (2 + 1)
    best = []
    for cfg in ((4096, 8, "compute"), (2048, 4, "compute"), (4096, 8, "lut"), (2048, 8, "lut"), (1024, 4, "lut")):
        ti.ACT_PASS = cfg
        t = bench_ms(lambda: ti._activation_pass(ys(), "gelu", (QS, -120, -128, 127), torch.bfloat16))
        rows.append({"kernel": f"GELU + requantization pass bf16 -> int8 [M, 3072], {cfg}", "ms": t,
                     "GB/s": act_bytes / t / 1e6})  # fmt: skip
        best.append((t, cfg))
    ti.ACT_PASS = min(best)[1]
    print(f"activation pass: {ti.ACT_PASS} end to end", flush=True)
    t = bench_ms(lambda: ys().view(torch.int16).to(torch.int8))
    rows.append({"kernel": "copy floor: int16 -> int8 cast [M, 3072] (torch)", "ms": t, "GB/s": act_bytes / t / 1e6})
    t = bench_ms(lambda: ti.quantize_static(x(), QS, -3, -128, 127))
    rows.append({"kernel": "quantize_static bf16 -> int8", "ms": t, "GB/s": nbytes / t / 1e6})
    t = bench_ms(lambda: F.layer_norm(x(), (c,), w, b, 1e-5))
    rows.append({"kernel": "F.layer_norm bf16 -> bf16 (reference)", "ms": t, "GB/s": m * c * 4 / t / 1e6})
    for r in rows:
        print(r, flush=True)
    return rows


# ---- 3. end to end ---------------------------------------------------------------------------------


class HandChained:
    """The deployed encoder's integer kernels called directly, residual adds folded into proj / fc2's epilogues.

    Built from a calibrated naive (linear-only) encoder: per linear the int8 weight codes, the folded
    epilogue and the input's static quantizer (``regcache.deploy``'s helpers); norms, attention (SDPA,
    with the block's prefix), deletion, embed and pool are the encoder's own.
    """

    def __init__(self, encoder) -> None:
        from regcache.deploy import _triton_int8 as ti
        from regcache.deploy.kernels import fold_epilogue
        from regcache.deploy.modules import StaticQuant

        self.ti, self.encoder, self.layers = ti, encoder, []
        for block in encoder.blocks:
            lins = {}
            for name, lin in (
                ("qkv", block.attn.qkv),
                ("proj", block.attn.proj),
                ("fc1", block.mlp.fc1),
                ("fc2", block.mlp.fc2),
            ):
                wq = lin.weight_quantizer
                codes = wq.quantize_int(lin.weight.float()).to(torch.int8).contiguous()
                q = StaticQuant.from_quantizer(lin.input_quantizer)
                alpha, beta = fold_epilogue(codes, q.scale, q.zero_point, wq.scale.reshape(-1), None, lin.bias)
                lins[name] = (codes, alpha.float(), beta.float(), q.as_tuple())
            self.layers.append(lins)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The embedding of images through the integer blocks."""
        ti, enc = self.ti, self.encoder
        x = enc.embed(images)
        for block, lins in zip(enc.blocks, self.layers, strict=True):
            if block.input_filter is not None:
                x = block.input_filter(x)
            b, n, c = x.shape
            attn, h, d = block.attn, block.attn.num_heads, block.attn.head_dim
            n1, n2 = block.norm1, block.norm2
            w, al, be, q = lins["qkv"]
            a = ti.layernorm_quantize(x, n1.weight, n1.bias, n1.eps, *lins["qkv"][3])
            qkv = ti.int8_linear(a.view(-1, c), w, al, be, out_dtype=x.dtype)
            qh, kh, vh = qkv.view(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
            o = attn._sdpa(qh, kh, vh, attn.prefix).transpose(1, 2).reshape(b * n, c)
            w, al, be, q = lins["proj"]
            x = ti.int8_linear(ti.quantize_static(o, *q), w, al, be, out_dtype=x.dtype, residual=x).view(b, n, c)
            w, al, be, q = lins["fc1"]
            hq = ti.layernorm_quantize(x, n2.weight, n2.bias, n2.eps, *q)
            hq = ti.int8_linear(
                hq.view(-1, c), w, al, be, activation="gelu", out_quant=lins["fc2"][3], out_dtype=x.dtype
            )
            w, al, be, q = lins["fc2"]
            x = ti.int8_linear(hq, w, al, be, out_dtype=x.dtype, residual=x).view(b, n, c)
        return enc.pool(x)


def calibrated_naive(batch_images: list[torch.Tensor]):
    """ViT-B/16 with naive W8A8 on the linears only (attention in float), calibrated in float32, cast to bf16."""
    enc, _ = vision_encoder("openclip-b16", "cuda", torch.float32)
    quantize_(enc, NaiveConfig(w_bits=8, a_bits=8, quantize_matmuls=False))
    calibrate_(enc, batch_images, progress=False)
    cast_model(enc, torch.bfloat16)
    return enc


def try_deploy(enc):
    """``deploy_`` of a copy of enc with the triton backend, or (None, reason)."""
    try:
        from regcache.deploy import DeployConfig, deploy_
    except ImportError as exc:
        return None, f"regcache.deploy.deploy_ not importable: {exc}"
    dep = copy.deepcopy(enc)
    try:
        out = deploy_(dep, DeployConfig(attention="float", backend="triton"))
        print(f"deploy_ report: {str(out)[:600]}", flush=True)
    except Exception as exc:  # report and carry on with the rest of the run
        traceback.print_exc()
        return None, f"deploy_ failed: {type(exc).__name__}: {exc}"
    return (out if isinstance(out, torch.nn.Module) else dep), ""


_REGCACHE: dict[int, list] = {}


def set_regcache(encoder, on: bool) -> None:
    """RegCache (random prefix on blocks >= L/2, top-4 deletion at L/2) on or off; the same tensors each time on.

    Installed once per encoder and put back after, so a CUDA graph captured with RegCache on stays valid.
    """
    remove_prefix(encoder)
    remove_deletion(encoder)
    if not on:
        return
    saved = _REGCACHE.get(id(encoder))
    if saved is None:
        install_random_regcache(encoder, encoder.num_blocks // 2)
        _REGCACHE[id(encoder)] = [(b.attn.prefix, b.input_filter) for b in encoder.blocks]
        return
    for block, (prefix, filt) in zip(encoder.blocks, saved, strict=True):
        block.attn.prefix, block.input_filter = prefix, filt


def cuda_graphed(fn, encoder):
    """fn replayed from CUDA graphs, one per (input shape, RegCache state): regcache.deploy.graphs.CudaGraphRunner."""
    from regcache.deploy.graphs import CudaGraphRunner

    return CudaGraphRunner(encoder, fn)


def enqueue_ms(fn, images, calls: int = 3) -> float:
    """Host milliseconds to enqueue one call (GPU idle at the start, no sync inside): the launch-bound floor."""
    import time

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(images)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / calls


def time_calls(fn, images, calls: int = 5) -> float:
    """Seconds per call over ``calls`` back-to-back calls, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn(images)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def e2e_section(batch: int, rounds: int, pairs: int) -> tuple[list[dict], dict, dict, torch.Tensor]:
    """images/s of every variant (interleaved rounds), RegCache overheads, cosines; the runnable variants."""
    g = torch.Generator(device="cuda").manual_seed(1)
    calib = [torch.randn(32, 3, 224, 224, device="cuda", generator=g) for _ in range(2)]
    images = torch.randn(batch, 3, 224, 224, device="cuda", generator=g).bfloat16()
    float_enc, _ = vision_encoder("openclip-b16", "cuda", torch.bfloat16)
    fq = calibrated_naive(calib)
    dep, why = try_deploy(fq)
    hand = HandChained(fq)
    variants = {"(a) float bf16, compiled blocks": (float_enc, regional(float_enc))}
    if dep is not None:
        variants["(b) W8A8 deploy_ (triton), eager"] = (dep, dep)
        variants["(b) + CUDA graphs"] = (dep, cuda_graphed(dep, dep))
    else:
        print(f"-- (b) skipped: {why}", flush=True)
    variants["(b') W8A8 kernels chained by hand, eager"] = (fq, hand)
    info = {"deploy_": why or "ok"}
    with torch.inference_mode():
        ref = fq(images[:64]).float()
        flt = float_enc(images[:64]).float()
        for label, (_, fn) in list(variants.items()):
            if label.startswith("(a)"):
                continue
            try:
                out = fn(images[:64]).float()
            except Exception as exc:  # report the variant and time the others
                traceback.print_exc()
                info[f"{label} failed"] = f"{type(exc).__name__}: {exc}"
                del variants[label]
                continue
            info[f"cosine to fake-quant (min): {label}"] = F.cosine_similarity(out, ref).min().item()
        info["cosine fake-quant to float (min)"] = F.cosine_similarity(ref, flt).min().item()
        set_regcache(fq, True)  # the same random registers and deletion on both (install_random_regcache's seed)
        ref_rc = fq(images[:64]).float()
        for label, (enc, fn) in list(variants.items()):
            if label.startswith("(a)"):
                continue
            set_regcache(enc, True)
            out = fn(images[:64]).float()
            info[f"cosine to fake-quant with RegCache (min): {label}"] = F.cosine_similarity(out, ref_rc).min().item()
            set_regcache(enc, False)
        set_regcache(fq, False)
        for label, (enc, fn) in list(variants.items()):  # warm: compile / autotune / capture both states
            try:
                for on in (True, False):
                    set_regcache(enc, on)
                    fn(images)
                    fn(images)
            except Exception as exc:  # report the variant (a graph that does not capture, say) and time the others
                traceback.print_exc()
                info[f"{label} failed"] = f"{type(exc).__name__}: {exc}"
                del variants[label]
                set_regcache(enc, False)
        torch.cuda.synchronize()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for label, (_, fn) in variants.items():
                times[label].append(time_calls(fn, images))
        rows = []
        base = batch / statistics.median(times["(a) float bf16, compiled blocks"])
        for label, ts in times.items():
            ips = batch / statistics.median(ts)
            rows.append({"variant": label, "images/s": ips, "ratio to (a)": ips / base})
        for label, (enc, fn) in variants.items():
            ratios = []
            for i in range(pairs):
                elapsed = {}
                for on in (False, True) if i % 2 == 0 else (True, False):
                    set_regcache(enc, on)
                    elapsed[on] = time_calls(fn, images, calls=3)
                ratios.append(elapsed[True] / elapsed[False])
            set_regcache(enc, False)
            overhead = 100 * (statistics.median(ratios) - 1)
            row = next(r for r in rows if r["variant"] == label)
            row["RegCache overhead %"] = overhead
            for on in (False, True):  # host time to launch one forward: above the GPU time, the host bounds it
                set_regcache(enc, on)
                info[f"host enqueue ms per forward, RegCache {'on' if on else 'off'}: {label}"] = enqueue_ms(fn, images)
            set_regcache(enc, False)
            rows.append({"variant": f"{label} + RegCache", "images/s": row["images/s"] / (1 + overhead / 100),
                         "ratio to (a)": row["ratio to (a)"] / (1 + overhead / 100)})  # fmt: skip
    for r in rows:
        print(r, flush=True)
    for k, v in info.items():
        print(f"{k}: {v}", flush=True)
    return rows, info, variants, images


def regcache_pieces(encoder, batch: int) -> dict[str, float]:
    """ms of RegCache's pieces at ViT-B/16's shapes: SDPA with / without the prefix (qkv-view operands as the
    blocks pass them, and contiguous ones), the K / V concatenation alone, the deletion."""
    set_regcache(encoder, True)
    block = next(b for b in encoder.blocks if b.attn.prefix is not None)
    attn, prefix = block.attn, block.attn.prefix
    h, d, n = attn.num_heads, attn.head_dim, 193
    qkv = torch.randn(batch, n, 3, h, d, device="cuda").bfloat16()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    qc, kc, vc = q.contiguous(), k.contiguous(), v.contiguous()
    x = torch.randn(batch, 197, h * d, device="cuda").bfloat16()
    out = {}
    with torch.inference_mode():
        out["SDPA, no prefix (qkv views)"] = bench_ms(lambda: attn._sdpa(q, k, v, None))
        out["SDPA, prefix (qkv views)"] = bench_ms(lambda: attn._sdpa(q, k, v, prefix))
        out["SDPA, no prefix (contiguous)"] = bench_ms(lambda: attn._sdpa(qc, kc, vc, None))
        out["SDPA, prefix (contiguous)"] = bench_ms(lambda: attn._sdpa(qc, kc, vc, prefix))
        pk = prefix.keys.expand(batch, -1, 4, -1)
        keys = torch.cat([pk, k], dim=-2)
        out["K concatenation alone (views)"] = bench_ms(lambda: torch.cat([pk, k], dim=-2))
        out["SDPA on the concatenated K / V only"] = bench_ms(
            lambda: F.scaled_dot_product_attention(q, keys, keys, scale=attn.scale)
        )
        deletion = next(b.input_filter for b in encoder.blocks if b.input_filter is not None)
        out["token deletion (top-4 of 196)"] = bench_ms(lambda: deletion(x))
    set_regcache(encoder, False)
    for k_, v_ in out.items():
        print(f"  RegCache piece: {k_}: {v_:.4f} ms", flush=True)
    return out


def profile_section(variants, images) -> dict[str, str]:
    """Top kernels by CUDA time for 3 forwards of each profiled variant; the tables go to $OUT."""
    from torch.profiler import ProfilerActivity, profile

    summaries = {}
    eager = {label: v for label, v in variants.items() if "CUDA graphs" not in label}
    runs = [(label, enc, fn, False) for label, (enc, fn) in eager.items()]
    runs += [(f"{label} + RegCache", e, f, True) for label, (e, f) in eager.items() if label[:3] in ("(a)", "(b)")]
    for label, enc, fn, on in runs:
        set_regcache(enc, on)
        with torch.inference_mode():
            fn(images)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    fn(images)
                torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        total = sum(e.self_device_time_total for e in events)
        events.sort(key=lambda e: -e.self_device_time_total)
        lines = [f"{label}: {total / 3e3:.2f} ms of kernels per forward"]
        for e in events[:18]:
            lines.append(
                f"  {e.self_device_time_total / 3e3:7.3f} ms  {100 * e.self_device_time_total / total:5.1f} %"
                f"  x{e.count // 3:<4d} {e.key[:110]}"
            )
        text = "\n".join(lines)
        print(text, flush=True)
        set_regcache(enc, False)
        tag = label.split()[0].strip("()").replace("'", "p") + ("_regcache" if on else "")
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40)
        (OUT / f"profile_{tag}.txt").write_text(text + "\n\n" + table)
        summaries[label] = text
    return summaries


def main() -> None:
    """Run the sections and print the tables last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--tune", nargs="*", choices=list(SHAPES), default=None,
                    help="time every tile candidate first for these GEMM shapes (none named: all)")  # fmt: skip
    ap.add_argument("--skip-gemm", action="store_true")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES), help="GEMM section's shapes")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--pairs", type=int, default=9)
    args = ap.parse_args()
    import triton

    OUT.mkdir(parents=True, exist_ok=True)
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):  # with / without RegCache: one graph each, never an eager fallback
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    torch.backends.cuda.matmul.allow_tf32 = True
    m = args.batch * 197
    tune = [] if args.tune is None else (args.tune or list(SHAPES))
    small = [] if args.skip_gemm else small_kernels_section(m)  # first: the fc1 sweep runs its picks
    gemm = [] if args.skip_gemm else gemm_section(m, tune, args.shapes)
    e2e, info, summaries = [], {}, {}
    if not args.skip_e2e:
        e2e, info, variants, images = e2e_section(args.batch, args.rounds, args.pairs)
        summaries = profile_section(variants, images)
        dep = next((enc for label, (enc, _) in variants.items() if label.startswith("(b)")), None)
        if dep is not None:
            info.update({f"RegCache piece ms: {k}": v for k, v in regcache_pieces(dep, args.batch).items()})
    sha = os.environ.get("GIT_COMMIT") or commit()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    head = f"{device_name()}, {date}, torch {torch.__version__}, triton {triton.__version__}, commit {sha}"
    extra = {"commit": sha, "triton": triton.__version__, "batch": args.batch, "gemm": gemm, "small": small,
             "info": info, "profiles": summaries}  # fmt: skip
    print(f"\n### {head}\n")
    if gemm:
        cols = ["shape", "bf16 TFLOP/s", "_int_mm TOP/s", "int8 plain TOP/s", "epilogue", "int8 model-epilogue TOP/s",
                "int8 / bf16", "config"]  # fmt: skip
        print(markdown_table(gemm, cols) + "\n")
        print(markdown_table(small, ["kernel", "ms", "GB/s"]) + "\n")
    for k, v in info.items():
        print(f"- {k}: {v}")
    write_results("bench_deploy", e2e, ["variant", "images/s", "ratio to (a)", "RegCache overhead %"], extra)


if __name__ == "__main__":
    main()
