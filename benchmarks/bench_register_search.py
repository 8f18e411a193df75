"""Time RegCache's steps on a ViT-B/16-shaped random open_clip model (or a tiny one on CPU with --tiny).

    python benchmarks/bench_register_search.py                 # GPU: sweep, curation of 1,000 images, the whole
                                                               # grid 20 cand x 15 tau x k {0,2,4,8} (+ base) = 1,201
                                                               # configurations on 1,000 images, compiled tail
    python benchmarks/bench_register_search.py --tiny          # CPU, tiny model, seconds

Measures (CUDA-synchronized wall time): the sensitivity sweep, curation, the cached register search
on the whole grid (``--max-configs`` caps it; compile time included, compiled tail by default on GPU),
the same cached search eagerly and the straightforward loop (full model per configuration) on the
first ``--loop-configs`` configurations; speed-ups are per configuration. Scores of the three on
the shared configurations are compared. Also: peak GPU memory of the search, the card's bf16
matmul rate (an 8192^3 matmul) and the fraction of it the search reaches, counting the tail
blocks' FLOPs (linears + attention matmuls, prefix included) over the reference images of every
configuration. Weights and images are random: the numbers time the machinery, they say nothing
about accuracy. Writes JSON to ``--out`` (default ``$OUT/bench_register_search.json``) and prints
a table last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from regcache.encoders import adapt
from regcache.loading import load_model
from regcache.quant import NaiveConfig
from regcache.registers import (
    EmbeddingCosine,
    RegisterSearch,
    SearchResult,
    ZeroShotTop1,
    curate_candidates,
    regcache_flops,
    sensitivity_sweep,
)
from regcache.registers.overhead import block_flops
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


class OverBudget(Exception):
    """Raised from the search's row callback when --budget-s is spent."""


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 20) -> float:
    """The card's dense matmul rate (TFLOP/s) on an n x n x n product in ``dtype`` (median of ``repeats``)."""
    if device.type != "cuda":
        n, repeats = 512, 3
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    t, _ = timed(lambda: a @ b, device, repeats=repeats)
    return 2 * n**3 / t / 1e12


def tail_flops(encoder, points, search: RegisterSearch, num_tokens: int, images: int) -> int:
    """FLOPs of the tail forwards of configurations ``points`` of ``search`` over ``images`` images."""
    total = 0
    for point in points:
        s = search._start(point)
        has_prefix = point.register is not None and point.tau > 0
        layers = range(point.l_start, encoder.num_blocks) if has_prefix else ()
        f = regcache_flops(encoder, num_tokens, prefix_layers=layers, l_q=search.l_q, delete_k=point.delete_k)
        total += f["regcache"] - sum(block_flops(encoder, layer, num_tokens) for layer in range(s))
    return total * images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU, tiny model, small grid (seconds)")
    p.add_argument("--model", default=None, help="open_clip model name (default ViT-B-16; tiny: regcache-tiny-vit)")
    p.add_argument("--reference", type=int, default=None, help="reference images (default 1000; tiny 16)")
    p.add_argument("--pool", type=int, default=None, help="curation pool images (default 1000; tiny 16)")
    p.add_argument("--calibration", type=int, default=None, help="calibration images (default 32; tiny 8)")
    p.add_argument("--batch-size", type=int, default=None, help="images per input batch (default 125; tiny 8)")
    p.add_argument("--eval-batch-size", type=int, default=None, help="images per search forward (default 1000)")
    p.add_argument("--candidates", type=int, default=None, help="register candidates (default 20; tiny 2)")
    p.add_argument("--taus", default=None, help="comma list (default 1..15; tiny 1,4)")
    p.add_argument("--ks", default=None, help="comma list of k~ (default 0,2,4,8; tiny 1,2)")
    p.add_argument("--l-q", type=int, default=None, help="sensitive block for the search (default L//2)")
    p.add_argument("--max-configs", type=int, default=None, help="cap the cached search's grid (default: all)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=200.0,
        help="stop the cached search after this many seconds and extrapolate the grid (0: never; default 200)",
    )
    p.add_argument("--loop-configs", type=int, default=None, help="configurations for the loop and eager (default 12)")
    p.add_argument(
        "--compile-tail",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the search's tail (default: on GPU, off with --tiny)",
    )
    p.add_argument(
        "--objective",
        choices=["cosine", "acc_ref"],
        default="cosine",
        help="acc_ref: zero-shot top-1 (random 1,000-class head, random labels), the CLI's default objective",
    )
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/bench_register_search.json)")
    args = p.parse_args()

    tiny = args.tiny
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    pick = lambda value, full, small: value if value is not None else (small if tiny else full)  # noqa: E731
    model_name = pick(args.model, "ViT-B-16", "regcache-tiny-vit")
    n_ref, n_pool = pick(args.reference, 1000, 16), pick(args.pool, 1000, 16)
    n_cal, bs = pick(args.calibration, 32, 8), pick(args.batch_size, 125, 8)
    eval_bs = pick(args.eval_batch_size, 1000, 16)
    n_cand = pick(args.candidates, 20, 2)
    taus = [int(t) for t in pick(args.taus, ",".join(map(str, range(1, 16))), "1,4").split(",")]
    ks = [int(k) for k in pick(args.ks, "0,2,4,8", "1,2").split(",")]
    loop_configs = pick(args.loop_configs, 12, 4)
    compile_tail = args.compile_tail if args.compile_tail is not None else device.type == "cuda"

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
    if args.objective == "acc_ref":
        with torch.no_grad():
            dim = encoder(ref[0][:1].to(dtype)).shape[-1]
        g = torch.Generator().manual_seed(4)
        head = torch.nn.functional.normalize(torch.randn(dim, 1000, generator=g), dim=0).to(device)
        objective = ZeroShotTop1(labels=torch.randint(0, 1000, (n_ref,), generator=g), classifier=head)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{model_name} on {device_name}: {encoder.num_blocks} blocks, {num_tokens} tokens, l_q={l_q}", flush=True)
    peak_tflops = matmul_tflops(device, torch.bfloat16 if device.type == "cuda" else dtype)
    print(f"matmul rate: {peak_tflops:.1f} TFLOP/s", flush=True)

    with torch.no_grad():
        t_sweep, sweep = timed(
            lambda: sensitivity_sweep(encoder, config, calib, ref, objective, progress=False), device
        )
        t_cur, candidates = timed(
            lambda: curate_candidates(encoder, pool, layers=l_q, k=n_cand, progress=False), device, repeats=3
        )

    def make_search(max_configs=None, compiled=False, state_path=None):
        search = RegisterSearch(
            encoder,
            config,
            calib,
            ref,
            objective,
            l_q,
            candidates,
            taus=taus,
            delete_ks=ks,
            progress=not tiny,
            eval_batch_size=eval_bs,
            compile_tail=compiled,
            state_path=state_path,
        )
        if max_configs is not None:
            search.points = search.points[:max_configs]
        return search

    state = Path(tempfile.mkdtemp()) / "search_state.json"
    cached_search = make_search(args.max_configs, compile_tail, state_path=state)
    n_cached = len(cached_search.points)
    stamps: list[float] = []  # when each row was recorded: the tenths of the grid below

    def on_row(_row) -> None:
        stamps.append(time.perf_counter())
        if args.budget_s and stamps[-1] - t0 > args.budget_s:
            raise OverBudget

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    try:
        cached = cached_search.run("cached", callback=on_row)
    except OverBudget:  # the rows recorded so far are in the state file
        rows = json.loads(state.read_text())["rows"]
        cached = SearchResult(cached_search.spec, rows, objective.greater_is_better, cached_search.stats)
    _sync(device)
    t_measured = time.perf_counter() - t0
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]  # dynamo graphs compiled by the cached search (its tail)
    n_done = len(cached.rows)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    # steady state: the second half of what ran (compilation, if any, happened at its start)
    steady = cached_search.stats.get("steady_s_per_config", t_measured / n_done)
    t_cached = t_measured + (n_cached - n_done) * steady  # = t_measured when the whole grid ran
    n_side = min(loop_configs, n_cached)
    eager_search = make_search(n_side, False)
    t_eager, eager = timed(lambda: eager_search.run("cached"), device)
    loop_search = make_search(n_side, False)
    t_loop, loop = timed(lambda: loop_search.run("naive_loop"), device)
    n_loop = len(loop_search.points)
    diff = lambda a, b: max(abs(a.scores()[k] - v) for k, v in b.scores().items() if k in a.scores())  # noqa: E731
    max_diff, diff_eager_loop, diff_compiled_eager = diff(cached, loop), diff(eager, loop), diff(cached, eager)
    per_cached, per_loop, per_eager = t_cached / n_cached, t_loop / n_loop, t_eager / n_loop
    flops = regcache_flops(encoder, num_tokens, prefix_layers=range(l_q, encoder.num_blocks), l_q=l_q, delete_k=0)
    search_flops = tail_flops(encoder, cached_search.points, cached_search, num_tokens, n_ref)
    calibration_flops = tail_flops(encoder, cached_search.points, cached_search, num_tokens, n_cal)
    achieved = tail_flops(encoder, cached_search.points[:n_done], cached_search, num_tokens, n_ref) / t_measured / 1e12

    # clock at the start and after each tenth of the grid (none for fewer than 10 configurations)
    tenths = [t0] + [stamps[(i + 1) * len(stamps) // 10 - 1] for i in range(10)] if len(stamps) >= 10 else []
    results = {
        "device": device_name,
        "model": model_name,
        "dtype": str(dtype),
        "blocks": encoder.num_blocks,
        "tokens": num_tokens,
        "method": config.tag,
        "objective": objective.name,
        "reference_images": n_ref,
        "calibration_images": n_cal,
        "pool_images": n_pool,
        "batch_size": bs,
        "eval_batch_size": eval_bs,
        "compile_tail": compile_tail,
        "l_q_search": l_q,
        "l_q_sweep": sweep.l_q,
        "sweep_s": t_sweep,
        "curation_s": t_cur,
        "curation_images_per_s": n_pool / t_cur,
        "search_grid": {"candidates": n_cand, "taus": taus, "ks": ks, "configs": n_cached},
        "search_cached_s": t_cached,
        "search_cached_measured_s": t_measured,
        "search_cached_configs_run": n_done,
        "search_cached_extrapolated": n_done < n_cached,
        "search_cached_per_config_s": per_cached,
        "search_cached_steady_per_config_s": steady,
        # seconds each tenth of the grid took (the first includes the compiles): where a slow start hides
        "search_cached_deciles_s": [b - a for a, b in itertools.pairwise(tenths)],
        "search_cached_peak_gib": peak_gib,
        "search_cached_dynamo_graphs": graphs,
        "eager_cached_configs": n_loop,
        "eager_cached_per_config_s": per_eager,
        "naive_loop_configs": n_loop,
        "naive_loop_s": t_loop,
        "naive_loop_per_config_s": per_loop,
        "naive_loop_full_grid_estimate_s": per_loop * n_cached,
        "speedup_per_config": per_loop / per_cached,
        "max_abs_score_diff_cached_vs_loop": max_diff,
        "max_abs_score_diff_eager_cached_vs_loop": diff_eager_loop,
        "max_abs_score_diff_cached_vs_eager_cached": diff_compiled_eager,
        "cached_stats": cached.stats,
        "matmul_tflops": peak_tflops,
        "search_tail_flops_reference": search_flops,
        "search_tail_flops_calibration": calibration_flops,
        "search_achieved_tflops": achieved,
        "search_fraction_of_matmul_rate": achieved / peak_tflops,
        "prefix_flops_relative": flops["prefix_relative"],
    }
    out = Path(args.out) if args.out else Path(os.environ.get("OUT", ".")) / "bench_register_search.json"
    write_json(out, results)

    mode = "compiled tail" if compile_tail else "eager"
    rows = [
        ("device", device_name),
        ("model / tokens / l_q / dtype", f"{model_name} / {num_tokens} / {l_q} / {str(dtype).split('.')[-1]}"),
        ("sensitivity sweep (all blocks)", f"{t_sweep:.2f} s"),
        (f"curation ({n_pool} images, median of 3)", f"{t_cur:.3f} s"),
        (
            f"cached search, {mode}, whole grid ({n_cached} configs, eval batch {eval_bs})",
            f"{t_cached:.2f} s = {per_cached * 1e3:.1f} ms/config (compile included)"
            + (f"; EXTRAPOLATED: {n_done} configs ran in {t_measured:.1f} s (--budget-s)" if n_done < n_cached else ""),
        ),
        ("cached search, steady state (2nd half of the grid)", f"{steady * 1e3:.1f} ms/config"),
        (
            "cached search, setup / first compiled configuration",
            " / ".join(f"{cached.stats.get(k, float('nan')):.2f} s" for k in ("prepare_s", "compile_s")),
        ),
        (
            "cached search, seconds per tenth of the grid",
            " ".join(f"{d:.1f}" for d in results["search_cached_deciles_s"]),
        ),
        ("dynamo graphs compiled by the cached search", str(graphs)),
        (f"cached search, eager ({n_loop} configs)", f"{t_eager:.2f} s = {per_eager * 1e3:.1f} ms/config"),
        (f"naive loop ({n_loop} configs)", f"{t_loop:.2f} s = {per_loop * 1e3:.1f} ms/config"),
        ("naive loop, whole grid (estimate)", f"{per_loop * n_cached:.1f} s"),
        ("speed-up per configuration (vs naive loop)", f"{per_loop / per_cached:.2f}x"),
        ("peak GPU memory of the search", f"{peak_gib:.2f} GiB"),
        ("bf16 matmul rate (8192^3)", f"{peak_tflops:.1f} TFLOP/s"),
        (
            "search FLOPs (tail x reference images x configs)",
            f"{search_flops / 1e15:.2f} PFLOP = {achieved:.1f} TFLOP/s"
            f" = {100 * achieved / peak_tflops:.1f} % of matmul rate",
        ),
        ("max |score diff| cached vs loop", f"{max_diff:.2e}"),
        ("max |score diff| eager cached vs loop", f"{diff_eager_loop:.2e}"),
        (f"max |score diff| {mode} vs eager cached", f"{diff_compiled_eager:.2e}"),
        ("prefix FLOPs (blocks >= l_q)", f"{100 * flops['prefix_relative']:.4f} %"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nwrote {out}")
    print("| step | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")


if __name__ == "__main__":
    main()
