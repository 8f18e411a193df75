"""Explicit vs fused quantized attention at ViT-B/16 shapes (12 heads, 197 tokens, head dim 64, bf16).

    python benchmarks/bench_attention.py                    # GPU: batch 256 and 1000, every quantizer,
                                                            # without / with a 1-entry prefix (tau 4)
    python benchmarks/bench_attention.py --tiny             # CPU, Triton interpreter, tiny shapes (CI)
    python benchmarks/bench_attention.py --tune             # GPU: also sweep BLOCK_M x BLOCK_N x num_warps

For each case the same ``Attention.attend`` runs with ``REGCACHE_FUSED_ATTENTION`` off (explicit:
scores, softmax, fake-quantized probabilities and P·V through HBM), the explicit path under
``torch.compile`` (what the search's compiled tail and compiled evaluation run; ``--no-compile``
skips it) and the fused kernel. Q, K, V are random with a shared direction and a sink key (peaky
rows, as in trained ViTs); the probability quantizers are calibrated on them: naive's uniform
8-bit (min-max, asymmetric), RepQ-ViT's log-√2 (8 and 4 bits, percentile search) and PTQ4ViT's
twin uniform 8-bit (reference quirk, split 2^-4). Reports median times, the fused kernel's
TFLOP/s (QKᵀ + PV), the kernel alone (``kernel_ms``: launched directly, without the wrapper's checks
and preparation), the max output difference to the explicit eager path (absolute and relative
to max |out|) and the fraction of probability codes that differ. Writes JSON via
benchmarks/common.py and prints the table last.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from pathlib import Path

if "--tiny" in sys.argv:  # before Triton is imported: the interpreter runs the kernel on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import time_fn, write_results

from regcache import kernels
from regcache.encoders.base import Attention, AttentionPrefix
from regcache.quant import UniformQuantizer
from regcache.quant import fused_attention as fa
from regcache.quant.log_quantizers import LogSqrt2Quantizer
from regcache.quant.twin_uniform import TwinSoftmaxQuantizer

QUANTIZERS = ("float", "naive uniform8", "repq log8", "repq log4", "ptq4vit twin8")


def make_qkv(b: int, h: int, n: int, d: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Random (B, heads, N, head_dim) q, k, v with peaky rows (shared direction, a sink key at token 0)."""
    g = torch.Generator(device=device).manual_seed(seed)
    mean = torch.randn(d, generator=g, device=device)
    q = torch.randn(b, h, n, d, generator=g, device=device) * 1.2 + mean
    k = torch.randn(b, h, n, d, generator=g, device=device) * 1.2
    k[:, :, 0] += 2.0 * mean
    v = torch.randn(b, h, n, d, generator=g, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_quantizer(name: str, probs: torch.Tensor) -> nn.Module | None:
    """A probability quantizer of ``name`` calibrated on ``probs``, in quant mode (None for float)."""
    if name == "float":
        return None
    if name.startswith("naive"):
        q = UniformQuantizer(8, symmetric=False).calibrate_(probs)
    elif name.startswith("repq"):
        q = LogSqrt2Quantizer(int(name[-1])).calibrate_(probs)
    else:
        q = TwinSoftmaxQuantizer(8, additive_quirk=True)
        q.set_split(2.0**-4)
        q.to(probs.device)
    q.set_mode("quant")
    return q


def attention_module(h: int, d: int, quantizer: nn.Module | None, prefix: AttentionPrefix | None, device: str):
    """An Attention whose P·V left operand goes through ``quantizer`` (Q / K / V unquantized: the kernel's part)."""
    attn = Attention(nn.Linear(h * d, 3 * h * d), nn.Linear(h * d, h * d), h).to(device)
    attn.matmul_pv.a_quantizer = quantizer
    attn.prefix = prefix
    return attn


def flip_fraction(attn: Attention, q, k, v) -> float:
    """Fraction of probability codes where the fused kernel and the explicit path differ (float: NaN)."""
    pq = attn.matmul_pv.a_quantizer
    if pq is None:
        return float("nan")
    seen = {}
    handle = pq.register_forward_hook(lambda m, i, o: seen.update(p=o))
    fa.set_enabled(False)
    with torch.no_grad():
        attn.attend(q, k, v)
    handle.remove()
    pe, prefix = seen["p"], attn.prefix
    if prefix is not None and prefix.log_multiplicity is not None:
        lm = prefix.log_multiplicity.reshape(-1, 1, 1, prefix.num_entries)
        ones = torch.ones(*lm.shape[:3], q.shape[-2], device=q.device, dtype=q.dtype)
        pe = pe * torch.cat([lm.exp().to(q.dtype), ones], -1)
    (pk, pv, bias, fac, qp), c = fa.prepare(q, attn.scale, pq, prefix)
    with torch.no_grad():
        _, pf = fa.launch(q, k, v, pk, pv, bias, fac, qp, **c, store_probs=True)
    return (pf != pe).float().mean().item()


def tune(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, warmup: int, repeats: int) -> None:
    """Print the fused kernel's time for each numerics x BLOCK_M x BLOCK_N x num_warps (errors reported, not fatal)."""
    grid = itertools.product((True, False), (32, 64, 128), (16, 32, 64), (4, 8))
    for exact, block_m, block_n, warps in grid:
        (pk, pv, bias, fac, qp), c = fa.prepare(q, attn.scale, attn.matmul_pv.a_quantizer, attn.prefix, exact)
        name = f"tune exact={int(exact)} BLOCK_M={block_m} BLOCK_N={block_n} num_warps={warps}"
        try:
            t = time_fn(
                lambda bm=block_m, bn=block_n, w=warps, c=c, x=(pk, pv, bias, fac, qp), e=exact: fa.launch(
                    q, k, v, *x, **c, block_m=bm, num_warps=w, block_n=bn, exact=e
                ),
                warmup=warmup,
                repeats=repeats,
            )
            print(f"{name}: {1000 * t:.3f} ms", flush=True)
        except Exception as exc:  # a configuration that does not fit (registers / shared memory): go on
            print(f"{name}: failed ({exc!r})", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Time every (batch, quantizer, prefix) case and print the table last."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny shapes (seconds)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 256 1000; tiny 2)")
    p.add_argument("--quantizers", nargs="+", default=list(QUANTIZERS), choices=QUANTIZERS)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd explicit path")
    p.add_argument("--block-m", type=int, default=0, help="query rows per program (0: the kernel's default)")
    p.add_argument("--num-warps", type=int, default=0, help="warps per program (0: the kernel's default)")
    p.add_argument("--block-n", type=int, default=0, help="keys per tile (0: the kernel's default)")
    p.add_argument("--exact", action="store_true", help="the exact kernel numerics (eager rounding), not the fast ones")
    p.add_argument(
        "--tune",
        action="store_true",
        help="also time BLOCK_M x BLOCK_N x num_warps on the first case without and with a prefix",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10; tiny 1)")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32", "float32-tf32"],
        default="bfloat16",
        help="activations; float32: full float32 products, float32-tf32: TF32 (matmul precision 'high', the CLI's)",
    )
    args = p.parse_args(argv)

    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    if not tiny and not torch.cuda.is_available():
        raise SystemExit("needs CUDA (or --tiny)")
    heads, tokens, head_dim = (2, 20, 64) if tiny else (12, 197, 64)
    batches = args.batches or ([2] if tiny else [256, 1000])
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = args.dtype == "float32-tf32"  # the explicit path and the kernel alike
    repeats = args.repeats or (1 if tiny else 10)
    warmup = 1 if tiny else 3
    compile_explicit = not (tiny or args.no_compile)
    torch.set_grad_enabled(False)
    kernels.set_kernel_config(fused_attention_exact=args.exact)

    rows, tuned = [], set()
    for batch in batches:
        q, k, v = make_qkv(batch, heads, tokens, head_dim, device, dtype)
        sample = slice(0, min(batch, 64))
        probs = ((q[sample].float() @ k[sample].float().transpose(-2, -1)) * head_dim**-0.5).softmax(-1)
        g = torch.Generator(device=device).manual_seed(1)
        keys = torch.randn(1, heads, 1, head_dim, generator=g, device=device, dtype=dtype) * 2
        values = torch.randn(1, heads, 1, head_dim, generator=g, device=device, dtype=dtype)
        lm = torch.full((1, 1, 1, 1), math.log(4.0), device=device)
        for qname in args.quantizers:
            quantizer = make_quantizer(qname, probs)
            for pname, prefix in (("none", None), ("1 entry, tau 4", AttentionPrefix(keys, values, lm, (4,)))):
                attn = attention_module(heads, head_dim, quantizer, prefix, device)
                npre = 0 if prefix is None else 1
                fa.set_enabled(False)
                explicit = attn.attend(q, k, v)
                t_explicit = time_fn(lambda a=attn, x=(q, k, v): a.attend(*x), warmup=warmup, repeats=repeats)
                t_compiled = float("nan")
                if compile_explicit:
                    compiled = torch.compile(attn.attend, dynamic=False)
                    t_compiled = time_fn(lambda c=compiled, x=(q, k, v): c(*x), warmup=warmup, repeats=repeats)
                    torch._dynamo.reset()
                keys_all, values_all = k, v
                if prefix is not None:  # flash attention's cost on the same key count (no τ: no mask)
                    keys_all = torch.cat([keys.expand(batch, -1, -1, -1), k], dim=-2)
                    values_all = torch.cat([values.expand(batch, -1, -1, -1), v], dim=-2)
                t_sdpa = time_fn(
                    lambda x=(q, keys_all, values_all): torch.nn.functional.scaled_dot_product_attention(*x),
                    warmup=warmup,
                    repeats=repeats,
                )
                fa.set_enabled(True)
                kw = {"block_m": args.block_m, "num_warps": args.num_warps, "block_n": args.block_n}

                def fused_call(a=attn, kw=kw, x=(q, k, v)):
                    return fa.quantized_attention(*x, a.scale, a.matmul_pv.a_quantizer, a.prefix, **kw)

                fused = fused_call()
                if fused is None:
                    raise SystemExit(f"fused attention did not run for {qname} / {pname}")
                t_fused = time_fn(fused_call, warmup=warmup, repeats=repeats)
                (pk, pv, bias, fac, qp), c = fa.prepare(q, attn.scale, attn.matmul_pv.a_quantizer, attn.prefix)
                t_kernel = time_fn(
                    lambda x=(q, k, v, pk, pv, bias, fac, qp), c=c, kw=kw: fa.launch(*x, **c, **kw),
                    warmup=warmup,
                    repeats=repeats,
                )
                flops = 2 * 2 * batch * heads * tokens * (tokens + npre) * head_dim
                diff = (fused.float() - explicit.float()).abs().max().item()
                rows.append(
                    {
                        "batch": batch,
                        "quantizer": qname,
                        "prefix": pname,
                        "explicit_ms": 1000 * t_explicit,
                        "compiled_ms": 1000 * t_compiled,
                        "fused_ms": 1000 * t_fused,
                        "kernel_ms": 1000 * t_kernel,
                        "float_sdpa_ms": 1000 * t_sdpa,
                        "speedup_vs_eager": t_explicit / t_fused,
                        "speedup_vs_compiled": t_compiled / t_fused,
                        "fused_tflops": flops / t_fused / 1e12,
                        "max_abs_diff": diff,
                        "max_rel_diff": diff / max(explicit.float().abs().max().item(), 1e-30),
                        "flip_fraction": flip_fraction(attn, q, k, v),
                    }
                )
                fa.set_enabled(False)
                print(rows[-1], flush=True)
                if args.tune and pname not in tuned:  # the first case without and the first with a prefix
                    print(f"tuning {qname} / {pname}", flush=True)
                    tune(attn, q, k, v, warmup, repeats)
                    tuned.add(pname)
    columns = list(rows[0])
    extra = {"heads": heads, "tokens": tokens, "head_dim": head_dim, "dtype": args.dtype, "interpreter": tiny}
    extra.update(exact=args.exact, tile=list(kernels.current().fused_attention_tile))
    write_results("bench_attention", rows, columns, extra)


if __name__ == "__main__":
    main()
