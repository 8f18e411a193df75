"""Where the time goes: torch.profiler tables of one benchmark workload (run where a target is missed).

    python benchmarks/profile_step.py eval --method naive --bits 8 [--regcache] [--compile]
    python benchmarks/profile_step.py search --configs 6
    python benchmarks/profile_step.py calibration --method noisyquant
    python benchmarks/profile_step.py noisyquant-steps        # seconds per NoisyQuant step kind (timers, no profiler)
    python benchmarks/profile_step.py cli-search --start 400 --configs 20 -- validate --config X.yaml ...
                                  # the CLI's own register search, on its own data (see profile_cli_search)

Prints the top operators by device time (self), then by CPU time, for the profiled steps only
(warm-up excluded). ViT-B/16 shapes, random weights and images. For kernel-level detail run the
same command under ``ncu --target-processes all -k regex:... python ...``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval_throughput import install_random_regcache
from common import device_name, sync, vision_encoder

from regcache.quant import METHODS, NaiveConfig, calibrate_, quantize_


def _images(n: int, size: int, device: str, seed: int, batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(min(batch, n - i), 3, size, size, generator=g).to(device) for i in range(0, n, batch)]


def _report(prof: profile, rows: int) -> None:
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows))
    if torch.cuda.is_available():
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows // 2))


def profile_eval(args, device: str) -> None:
    """One forward at the benchmark's batch, eager or compiled."""
    encoder, size = vision_encoder(args.model, device, torch.bfloat16)
    if args.regcache:
        install_random_regcache(encoder, encoder.num_blocks // 2)
    if args.method != "float":
        quantize_(encoder, METHODS[args.method](w_bits=args.bits, a_bits=args.bits))
        calibrate_(encoder, _images(32, size, device, 1, 32), progress=False)
    fn = torch.compile(encoder) if args.compile else encoder
    x = torch.randn(args.batch, 3, size, size, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        sync()
        with profile(activities=_activities()) as prof:
            for _ in range(args.steps):
                fn(x)
            sync()
    _report(prof, args.rows)


def profile_search(args, device: str) -> None:
    """A few configurations of the cached register search (setup excluded)."""
    from regcache.encoders import adapt
    from regcache.loading import load_model
    from regcache.registers import EmbeddingCosine, RegisterSearch, curate_candidates

    encoder = adapt(load_model("ViT-B-16", device=device).model).to(dtype=torch.bfloat16).eval()
    l_q = encoder.num_blocks // 2
    ref = [x.bfloat16() for x in _images(args.reference, 224, device, 2, 125)]
    calib = [x.bfloat16() for x in _images(32, 224, device, 1, 32)]
    with torch.no_grad():
        candidates = curate_candidates(encoder, ref, layers=l_q, k=4, progress=False)
    search = RegisterSearch(
        encoder, NaiveConfig(8, 8), calib, ref, EmbeddingCosine(), l_q, candidates, taus=range(1, 16),
        delete_ks=(2,), progress=False, eval_batch_size=1000, compile_tail=args.compile,
    )  # fmt: skip
    points = [p for p in search.points if p.mode == "both"]
    search.points = points[:2]
    search.run("cached")  # warm-up, setup and compilation
    todo = points[2 : 2 + args.configs]
    search.points = todo
    sync()
    with profile(activities=_activities()) as prof:
        search.run("cached")
        sync()
    _report(prof, args.rows)
    _search_split(search, todo)
    if torch.cuda.is_available():
        _sync_sites(search, todo[:2])


def profile_cli_search(args, device: str) -> None:
    """The register search as ``regcache validate`` runs it: its data, loaders, callback and dtype.

    Configurations ``[start, start + configs)`` are timed with a sync around them, the next
    ``configs`` run under the profiler, then the grid stops (validation still runs; pass
    ``--trainer.limit_val_batches=2`` to keep it short). The benchmark's random on-device inputs can
    hide costs of the real path: this is how six per-worker calibration batches were found
    (2,648 kernel launches per configuration against 498, BENCHMARKS.md §1).
    """
    from regcache.cli import main as cli
    from regcache.registers.search import RegisterSearch

    start, n = args.start, args.configs
    run_point, run = RegisterSearch._run_point, RegisterSearch.run
    seen: dict[str, Any] = {"i": 0}

    def timed_point(self, point, strategy):
        i = seen["i"]
        seen["i"] += 1
        if i == start:
            sync()
            seen["t0"] = time.perf_counter()
        if i == start + n:
            sync()
            synced = (time.perf_counter() - seen["t0"]) / n
            print(f"cli-search: {1e3 * synced:.1f} ms per configuration (synced, {n} configurations)", flush=True)
            seen["prof"] = profile(activities=_activities())
            seen["prof"].__enter__()
        out = run_point(self, point, strategy)
        if i == start + 2 * n - 1:
            sync()
            seen["prof"].__exit__(None, None, None)
            averages = seen["prof"].key_averages()
            launches = sum(e.count for e in averages if "LaunchKernel" in e.key)
            print(f"cli-search: {launches / n:.0f} kernel launches per configuration (profiled)", flush=True)
            _report(seen["prof"], args.rows)
        return out

    def cut_run(self, *a, **kw):
        shapes = [tuple(x.shape) for x in self.calibration]
        print(f"cli-search: {len(self.points)} configurations, {self.dtype}, calibration batches {shapes}", flush=True)
        self.points = self.points[: start + 2 * n]
        return run(self, *a, **kw)

    RegisterSearch._run_point, RegisterSearch.run = timed_point, cut_run
    try:
        cli(args.cli)
    finally:
        RegisterSearch._run_point, RegisterSearch.run = run_point, run


def _sync_sites(search: Any, points: list[Any]) -> None:
    """Where a configuration's queued work waits for the GPU (host syncs), and its host time without syncing.

    Runs install + re-calibration + tail of each point under ``torch.cuda.set_sync_debug_mode("warn")``
    and prints the regcache frames of every synchronizing call; the score is not read.
    """
    import traceback
    import warnings

    sites: dict[str, int] = {}
    host: list[float] = []

    def on_warning(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack() if "/regcache/" in f.filename]
        key = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))
        sites[key] = sites.get(key, 0) + 1

    previous = warnings.showwarning
    warnings.showwarning = on_warning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = on_warning
            for point in points:
                sync()
                torch.cuda.set_sync_debug_mode("warn")
                t0 = time.perf_counter()
                with torch.no_grad():
                    search.install(point)
                    search._recalibrate(point, "cached")
                    search._evaluate_tail(search._start(point), search.compile_tail)
                host.append(time.perf_counter() - t0)
                torch.cuda.set_sync_debug_mode("default")
                sync()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = previous
    print(f"host time per configuration without reading the score: {[round(1e3 * t, 1) for t in host]} ms")
    print("synchronizing calls (count per site):" if sites else "no synchronizing call")
    for key, n in sorted(sites.items(), key=lambda kv: -kv[1]):
        print(f"  {n} x {key}")


def _search_split(search: Any, points: list[Any]) -> None:
    """Synchronized wall time per configuration of its three steps: install, re-calibration, tail forward."""
    parts = {"install": [], "recalibration": [], "tail forward + score": []}
    for point in points:
        for name, fn in (
            ("install", lambda p=point: search.install(p)),
            ("recalibration", lambda p=point: search._recalibrate(p, "cached")),
            (
                "tail forward + score",
                lambda p=point: float(search._evaluate_tail(search._start(p), search.compile_tail)),
            ),
        ):
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            sync()
            parts[name].append(time.perf_counter() - t0)
    print("| step (synchronized) | ms / configuration |\n|---|---|")
    for name, ts in parts.items():
        print(f"| {name} | {1e3 * statistics.median(ts):.1f} |")


def profile_calibration(args, device: str) -> None:
    """One calibration of a method (fp32, the benchmark's image counts)."""
    n = {"noisyquant": 1024}.get(args.method, 32)
    encoder, size = vision_encoder(args.model, device, torch.float32)
    batches = _images(n, size, device, 0, 32)
    with profile(activities=_activities()) as prof:
        quantize_(encoder, METHODS[args.method](w_bits=args.bits, a_bits=args.bits))
        calibrate_(encoder, batches, progress=False)
        sync()
    _report(prof, args.rows)


def profile_noisyquant_steps(args, device: str) -> None:
    """NoisyQuant's calibration with synchronized timers around each step kind (no profiler overhead), twice."""
    from regcache.quant.methods import noisyquant as nq

    totals: dict[str, float] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            sync()
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    cls = nq.NoisyQuantConfig
    patched = {"_capture": "input capture", "_set_clip": "clip search", "_set_noise": "noise search"}
    originals = {attr: getattr(cls, attr) for attr in patched}
    for attr, name in patched.items():
        setattr(cls, attr, timed(name, originals[attr]))
    try:
        batches = _images(1024, 224, device, 0, 32)
        for run in ("first (kernels compile)", "second"):
            totals.clear()
            encoder, _ = vision_encoder(args.model, device, torch.float32)
            sync()
            t0 = time.perf_counter()
            config = METHODS["noisyquant"](w_bits=args.bits, a_bits=args.bits)
            config.search_precision = args.noisyquant_precision
            quantize_(encoder, config)
            calibrate_(encoder, batches, progress=False)
            sync()
            total = time.perf_counter() - t0
            rest = total - sum(totals.values())
            parts = "; ".join(f"{k} {v:.2f} s" for k, v in totals.items())
            print(f"{run} run: total {total:.2f} s = {parts}; rest (block forwards, weights) {rest:.2f} s", flush=True)
    finally:
        for attr, fn in originals.items():
            setattr(cls, attr, fn)


def _activities() -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])


WORKLOADS = {
    "eval": profile_eval,
    "search": profile_search,
    "calibration": profile_calibration,
    "noisyquant-steps": profile_noisyquant_steps,
    "cli-search": profile_cli_search,
}


def main() -> None:
    """Parse the workload and print its profile."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload", choices=sorted(WORKLOADS))
    ap.add_argument("--model", default="openclip-b16")
    ap.add_argument("--method", default="naive")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="eval: forwards profiled")
    ap.add_argument("--configs", type=int, default=6, help="search: configurations profiled")
    ap.add_argument("--reference", type=int, default=1000, help="search: reference images")
    ap.add_argument("--regcache", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--noisyquant-precision", default="auto", help="noisyquant-steps: search_precision")
    ap.add_argument("--matmul-precision", default="highest", choices=["highest", "high"], help="float32 matmuls")
    ap.add_argument("--start", type=int, default=400, help="cli-search: configurations run before timing")
    argv = sys.argv[1:]
    cli_args = argv[argv.index("--") + 1 :] if "--" in argv else []  # cli-search: the regcache command line
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.cli = cli_args
    if args.workload == "cli-search" and not cli_args:
        ap.error("cli-search needs the regcache command after --, e.g. -- validate --config my.yaml")
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"profile {args.workload} on {device_name()}, torch {torch.__version__}", flush=True)
    WORKLOADS[args.workload](args, device)


if __name__ == "__main__":
    main()
