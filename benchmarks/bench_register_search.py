"""Time RegCache's steps on a ViT-B/16-shaped random open_clip model (or a tiny one on CPU with --tiny).

    python benchmarks/bench_register_search.py                 # GPU: sweep, curation of 1,000 images,
                                                               # search 20 cand x 15 tau x 4 k on 1,000 images
    python benchmarks/bench_register_search.py --tiny          # CPU, tiny model, seconds

Measures (CUDA-synchronized wall time): the sensitivity sweep, curation, the cached register search
on the whole grid, and the straightforward loop (full model per configuration) on the first
``--loop-configs`` configurations of the same grid; the speed-up is per configuration. Both
strategies' scores on the shared configurations are compared. Weights and images are random: the
numbers time the machinery, they say nothing about accuracy. Writes JSON to ``--out`` (default
``$OUT/bench_register_search.json``) and prints a table last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from regcache.encoders import adapt
from regcache.loading import load_model
from regcache.quant import NaiveConfig
from regcache.registers import (
    EmbeddingCosine,
    RegisterSearch,
    curate_candidates,
    regcache_flops,
    sensitivity_sweep,
)
from regcache.utils import seed_everything, write_json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1):
    """Median wall time over ``repeats`` runs (synchronized) and the last result."""
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def random_batches(n: int, batch_size: int, size: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    """Random normalized-looking images (not zeros), kept on the device."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(min(batch_size, n - i), 3, size, size, generator=g).to(device) for i in range(0, n, batch_size)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny model, small grid (seconds)")
    p.add_argument("--model", default=None, help="open_clip model name (default ViT-B-16; tiny: regcache-tiny-vit)")
    p.add_argument("--reference", type=int, default=None, help="reference images (default 1000; tiny 16)")
    p.add_argument("--pool", type=int, default=None, help="curation pool images (default 1000; tiny 16)")
    p.add_argument("--calibration", type=int, default=None, help="calibration images (default 32; tiny 8)")
    p.add_argument("--batch-size", type=int, default=None, help="images per batch (default 125; tiny 8)")
    p.add_argument("--candidates", type=int, default=None, help="register candidates (default 20; tiny 2)")
    p.add_argument("--taus", default=None, help="comma list (default 1..15; tiny 1,4)")
    p.add_argument("--ks", default=None, help="comma list of k~ (default 1,2,4,8; tiny 1,2)")
    p.add_argument("--l-q", type=int, default=None, help="sensitive block for the search (default L//2)")
    p.add_argument("--max-configs", type=int, default=None, help="cap the cached search's grid (default: all)")
    p.add_argument("--loop-configs", type=int, default=None, help="configurations for the naive loop (default 24)")
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/bench_register_search.json)")
    args = p.parse_args()

    tiny = args.tiny
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    pick = lambda value, full, small: value if value is not None else (small if tiny else full)  # noqa: E731
    model_name = pick(args.model, "ViT-B-16", "regcache-tiny-vit")
    n_ref, n_pool = pick(args.reference, 1000, 16), pick(args.pool, 1000, 16)
    n_cal, bs = pick(args.calibration, 32, 8), pick(args.batch_size, 125, 8)
    n_cand = pick(args.candidates, 20, 2)
    taus = [int(t) for t in pick(args.taus, ",".join(map(str, range(1, 16))), "1,4").split(",")]
    ks = [int(k) for k in pick(args.ks, "1,2,4,8", "1,2").split(",")]
    loop_configs = pick(args.loop_configs, 24, 4)

    seed_everything(0)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.backends.cuda.matmul.allow_tf32 = True
    encoder = adapt(load_model(model_name, device=str(device)).model).to(dtype=dtype).eval()
    size = encoder.image_size[0] if isinstance(encoder.image_size, tuple) else encoder.image_size
    l_q = args.l_q if args.l_q is not None else encoder.num_blocks // 2
    calib = random_batches(n_cal, bs, size, device, seed=1)
    ref = random_batches(n_ref, bs, size, device, seed=2)
    pool = random_batches(n_pool, bs, size, device, seed=3)
    config, objective = NaiveConfig(8, 8), EmbeddingCosine()
    num_tokens = encoder.embed(ref[0][:1].to(dtype)).shape[1]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{model_name} on {device_name}: {encoder.num_blocks} blocks, {num_tokens} tokens, l_q={l_q}")

    with torch.no_grad():
        t_sweep, sweep = timed(
            lambda: sensitivity_sweep(encoder, config, calib, ref, objective, progress=False), device
        )
        t_cur, candidates = timed(
            lambda: curate_candidates(encoder, pool, layers=l_q, k=n_cand, progress=False), device, repeats=3
        )

    def make_search(max_configs=None):
        search = RegisterSearch(
            encoder, config, calib, ref, objective, l_q, candidates, taus=taus, delete_ks=ks, progress=not tiny
        )
        if max_configs is not None:
            search.points = search.points[:max_configs]
        return search

    cached_search = make_search(args.max_configs)
    t_cached, cached = timed(lambda: cached_search.run("cached"), device)
    n_cached = len(cached_search.points)
    loop_search = make_search(min(loop_configs, n_cached))
    t_loop, loop = timed(lambda: loop_search.run("naive_loop"), device)
    n_loop = len(loop_search.points)
    shared = loop.scores()
    max_diff = max(abs(cached.scores()[k] - v) for k, v in shared.items())
    per_cached, per_loop = t_cached / n_cached, t_loop / n_loop
    flops = regcache_flops(encoder, num_tokens, prefix_layers=range(l_q, encoder.num_blocks), l_q=l_q, delete_k=0)

    results = {
        "device": device_name,
        "model": model_name,
        "blocks": encoder.num_blocks,
        "tokens": num_tokens,
        "method": config.tag,
        "objective": objective.name,
        "reference_images": n_ref,
        "calibration_images": n_cal,
        "pool_images": n_pool,
        "batch_size": bs,
        "l_q_search": l_q,
        "l_q_sweep": sweep.l_q,
        "sweep_s": t_sweep,
        "curation_s": t_cur,
        "curation_images_per_s": n_pool / t_cur,
        "search_grid": {"candidates": n_cand, "taus": taus, "ks": ks, "configs": n_cached},
        "search_cached_s": t_cached,
        "search_cached_per_config_s": per_cached,
        "naive_loop_configs": n_loop,
        "naive_loop_s": t_loop,
        "naive_loop_per_config_s": per_loop,
        "naive_loop_full_grid_estimate_s": per_loop * n_cached,
        "speedup_per_config": per_loop / per_cached,
        "max_abs_score_diff_cached_vs_loop": max_diff,
        "cached_stats": cached.stats,
        "prefix_flops_relative": flops["prefix_relative"],
    }
    out = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "bench_register_search.json"
    write_json(out, results)

    rows = [
        ("device", device_name),
        ("model / tokens / l_q", f"{model_name} / {num_tokens} / {l_q}"),
        ("sensitivity sweep (all blocks)", f"{t_sweep:.2f} s"),
        (f"curation ({n_pool} images, median of 3)", f"{t_cur:.3f} s"),
        (f"cached search ({n_cached} configs)", f"{t_cached:.2f} s = {per_cached * 1e3:.1f} ms/config"),
        (f"naive loop ({n_loop} configs)", f"{t_loop:.2f} s = {per_loop * 1e3:.1f} ms/config"),
        ("naive loop, whole grid (estimate)", f"{per_loop * n_cached:.1f} s"),
        ("speed-up per configuration", f"{per_loop / per_cached:.2f}x"),
        ("max |score diff| cached vs loop", f"{max_diff:.2e}"),
        ("prefix FLOPs (blocks >= l_q)", f"{100 * flops['prefix_relative']:.4f} %"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nwrote {out}")
    print("| step | time |\n|---|---|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


if __name__ == "__main__":
    main()
