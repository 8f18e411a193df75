"""Input pipeline: JPEG decode + preprocessing (CPU workers, GPU nvJPEG) against the model's own speed.

Workload 4 of the benchmark suite. Builds ``--images`` realistic JPEG samples (the ImageNet
one-per-class sample re-encoded at ImageNet-validation resolution, shorter side ``--short-side``,
repeated) in tar shards under a temporary directory, then measures images/s for two models:
``float`` (the ViT-B/16 vision tower, random weights, ``--dtype``) and ``naive W8A8 + fidelity``
(the same tower quantized with ``regcache.quant``'s naive W8A8, and the float model run on every
batch too, as ``QuantizedEncoder(fidelity=True)`` does: the workload of a validate run).

* ``model only``: each model on random tensors of ``--batch`` images (median of 10; ``--compile``
  adds the compiled float model);
* data only: ``cpu decode`` (PIL + the open_clip eval transform in ``--workers`` workers);
  ``nvjpeg decode only`` (no resize); ``gpu decode`` = nvJPEG + resize / crop / normalize on the
  device, image by image (the path before) / grouped by decoded size / grouped and prefetched
  (``DecodePrefetcher``: a background thread on its own CUDA stream, ``--prefetch-depth`` ahead);
* ``end to end, loop``: a plain loop over a loader feeding a model;
* ``end to end, trainer.validate``: a minimal LightningModule on the datamodule
  (``decode_on_gpu``), the first ``--validate-images`` images, stopped after
  ``--validate-budget-s`` seconds whatever happens (the row says so), so it cannot time out.

``ratio`` = images/s ÷ model-only images/s of the row's model (data-only rows: of the float
model). Target: ``trainer.validate`` ≥ 0.8, i.e. compute-bound. All rates are steady state: the
first batch (worker start-up) is not timed; validate rows add ``wall_images_per_s``, the whole
``trainer.validate`` call including start-up and teardown. The run prints every row as it is
measured and the table last; ``--watchdog-s`` dumps every thread's stack and exits if it hangs.

    python benchmarks/bench_input_pipeline.py [--src .bench/data/imagenet1k_sample] [--images 10000]
    python benchmarks/bench_input_pipeline.py --tiny     # CPU smoke test: 48 images, tiny model
"""

from __future__ import annotations

import argparse
import faulthandler
import io
import itertools
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval_throughput import cast_model
from common import sync, time_fn, vision_encoder, write_results
from make_synthetic_shards import read_samples, write_shards

REPO = Path(__file__).resolve().parents[1]
FLOAT, QUANT = "float", "naive W8A8 + fidelity"
COLUMNS = ("path", "model", "workers", "images", "images_per_s", "ratio_to_model", "wall_images_per_s", "seconds")
COLUMNS += ("stopped_by_budget",)


def build_shards(src: Path, out: Path, images: int, short_side: int | None, quality: int, shards: int) -> int:
    """``images`` samples of ``src``'s test split, repeated, re-encoded, in ``shards`` shards; returns the count."""
    per_copy = len(read_samples(src, "test"))
    copies = math.ceil(images / per_copy)
    shard_size = math.ceil(images / shards)
    n, _ = write_shards(src, out, copies, shard_size, short_side=short_side, quality=quality, limit=images)
    return n


def images_per_second(batches: Iterable[dict], consume: Callable[[dict], object]) -> tuple[float, int]:
    """Steady-state images/s over ``batches`` (the first batch, with the worker start-up, is not timed)."""
    it = iter(batches)
    consume(next(it))
    sync()
    start, n = time.perf_counter(), 0
    for batch in it:
        consume(batch)
        n += len(batch["key"])
    sync()
    seconds = time.perf_counter() - start
    return (n / seconds if n else float("nan")), n


def with_fidelity(encoder: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The quantized model, then the plain float model on the same batch (``QuantizedEncoder(fidelity=True)``)."""
    from regcache.registers import plain_float

    def run(images: torch.Tensor) -> torch.Tensor:
        out = encoder(images)
        with plain_float(encoder):
            encoder(images)
        return out

    return run


def build_models(args, device: str, dtype: torch.dtype) -> tuple[dict, int]:
    """{name: (encoder, run)} for the float model and (unless --no-quant) the quantized + fidelity workload."""
    from regcache.encoders import adapt
    from regcache.loading import load_model
    from regcache.quant import NaiveConfig, calibrate_, quantize_

    def encoder_in(precision: torch.dtype) -> tuple[torch.nn.Module, int]:
        if args.model == "tiny":
            torch.manual_seed(0)
            return adapt(load_model("regcache-tiny-vit").model.visual).to(device, precision).eval(), 64
        return vision_encoder(args.model, device, precision)

    encoder, size = encoder_in(dtype)
    models = {FLOAT: (encoder, encoder)}
    if not args.no_quant:  # calibrated in float32, then cast (quantizer scales stay float32), as bench_eval_throughput
        quantized, _ = encoder_in(torch.float32)
        quantize_(quantized, NaiveConfig(w_bits=8, a_bits=8))
        g = torch.Generator().manual_seed(0)
        calibrate_(quantized, [torch.randn(16, 3, size, size, generator=g).to(device)], progress=False)
        cast_model(quantized, dtype)
        models[QUANT] = (quantized, with_fidelity(quantized))
    return models, size


def distinct_sizes_per_batch(raw: list[bytes], batch: int) -> float:
    """Mean number of distinct decoded (H, W) per batch of ``raw`` (read off the JPEG headers)."""
    from PIL import Image

    sizes = []
    for i in range(0, len(raw), batch):
        sizes.append(len({Image.open(io.BytesIO(b)).size for b in raw[i : i + batch]}))
    return statistics.mean(sizes)


class _OutOfBudget(Exception):
    pass


def lightning_validate(
    datamodule, encoder: torch.nn.Module, run: Callable, dtype: torch.dtype, batches: int, budget_s: float
) -> dict:
    """``trainer.validate`` of a module running ``run`` per batch: images, rates, whether the budget stopped it."""
    from regcache._lightning import pl

    clock: dict[str, float] = {}

    class Forward(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.seen = self.first = 0

        def validation_step(self, batch, batch_idx):
            run(batch["image"].to(dtype))
            self.seen += len(batch["key"])
            if batch_idx == 0:  # steady state from here (one sync, not one per batch)
                sync()
                clock["first"], self.first = time.perf_counter(), self.seen
            elif time.perf_counter() - clock["start"] > budget_s:
                sync()
                clock["last"] = time.perf_counter()
                raise _OutOfBudget

        def on_validation_epoch_end(self) -> None:
            sync()
            clock["last"] = time.perf_counter()

    module = Forward()
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=batches,
    )
    home = next(encoder.parameters()).device  # Lightning's teardown moves the module to the CPU
    sync()
    clock["start"] = time.perf_counter()
    stopped = False
    try:
        trainer.validate(module, datamodule=datamodule, verbose=False)
    except _OutOfBudget:
        stopped = True
    encoder.to(home)  # the later rows reuse it
    sync()
    seconds = time.perf_counter() - clock["start"]
    steady_n = module.seen - module.first
    steady_s = clock.get("last", 0.0) - clock.get("first", 0.0)
    return {
        "images": module.seen,
        "seconds": seconds,
        "images_per_s": steady_n / steady_s if steady_n and steady_s > 0 else float("nan"),
        "wall_images_per_s": module.seen / seconds,
        "stopped_by_budget": stopped,
    }


def main() -> None:
    """Build the shards, time every path and print the table last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=None, help="default .bench/data/imagenet1k_sample (--tiny: the bundled sample)")
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--short-side", type=int, default=375, help="0 keeps the source resolution")
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--shards", type=int, default=56, help="shard count (56: whole shards for 4, 8 and 14 workers)")
    ap.add_argument("--workers", type=int, nargs="*", default=[4, 8, 14])
    ap.add_argument("--gpu-workers", type=int, default=4, help="workers of the GPU-decode loader (read bytes only)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--model", default="openclip-b16")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prefetch-depth", type=int, default=2, help="batches decoded ahead by DecodePrefetcher")
    ap.add_argument("--compile", action="store_true", help="also time the compiled float model (model only)")
    ap.add_argument("--no-quant", action="store_true", help="skip the naive W8A8 + fidelity rows")
    ap.add_argument("--no-lightning", action="store_true", help="skip the trainer.validate runs")
    ap.add_argument("--validate-images", type=int, default=5120, help="images per trainer.validate run (at most)")
    ap.add_argument("--validate-budget-s", type=float, default=30.0, help="stop a trainer.validate run after this")
    ap.add_argument("--watchdog-s", type=float, default=280.0, help="dump all stacks and exit past this (0: off)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: 48 images, a tiny model, 0/2 workers")
    args = ap.parse_args()
    if args.tiny:
        args.images, args.workers, args.gpu_workers, args.batch, args.model = 48, [0, 2], 2, 16, "tiny"
        args.short_side, args.shards, args.validate_images = 300, 4, 48
    if args.src is None:
        from regcache.testbed.data import DATA_DIR

        tiny_src = DATA_DIR / "imagenet1k_sample_small"
        args.src = str(tiny_src if args.tiny else REPO / ".bench" / "data" / "imagenet1k_sample")
    if args.watchdog_s > 0:
        faulthandler.dump_traceback_later(args.watchdog_s, exit=True)
    import open_clip

    from datamodules import WebDatasetDataModule
    from regcache.data.gpu_decode import DecodePrefetcher, TensorPreprocess
    from regcache.data.reader import ShardDataset, collate

    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if device == "cuda" else torch.float32
    models, size = build_models(args, device, dtype)
    transform = open_clip.image_transform(
        size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )
    gpu_preprocess = TensorPreprocess.from_transform(transform)
    on = "" if device == "cuda" else " [on cpu]"
    rows: list[dict] = []
    model_rate: dict[str, float] = {}
    extra: dict = {"batch": args.batch, "dtype": str(dtype), "short_side": args.short_side}

    def row(path: str, model: str, workers: int | str, rate: float, images: int, **more) -> None:
        rows.append({"path": path, "model": model, "workers": workers, "images": images, "images_per_s": rate})
        rows[-1].update(more)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)

    def elapsed(phase: str) -> None:
        print(f"-- {phase} done at {time.perf_counter() - t_start:.0f} s", flush=True)

    try:
        with tempfile.TemporaryDirectory(prefix="regcache-pipeline-") as tmp:
            root = Path(tmp)
            start = time.perf_counter()
            n = build_shards(Path(args.src), root, args.images, args.short_side or None, args.quality, args.shards)
            urls = sorted(str(p) for p in (root / "test").glob("*.tar"))
            extra["avg_jpeg_kb"] = sum(Path(u).stat().st_size for u in urls) / n / 1024
            seconds = time.perf_counter() - start
            print(f"{n} samples in {len(urls)} shards ({extra['avg_jpeg_kb']:.0f} KB each) in {seconds:.1f} s")

            def loader(workers: int, raw: bool) -> torch.utils.data.DataLoader:
                dataset = ShardDataset(urls, transform=transform, raw_images=raw)
                return torch.utils.data.DataLoader(
                    dataset,
                    batch_size=args.batch,
                    num_workers=workers,
                    collate_fn=collate,
                    pin_memory=device == "cuda" and not raw,
                    persistent_workers=False,
                    prefetch_factor=4 if workers else None,
                )

            def prefetched(workers: int) -> DecodePrefetcher:
                return DecodePrefetcher(loader(workers, raw=True), gpu_preprocess, device, args.prefetch_depth)

            def images_of(batch: dict) -> torch.Tensor:
                if "image_pending" in batch:
                    return batch["image_pending"].wait()
                if "image_bytes" in batch:
                    return gpu_preprocess(batch["image_bytes"], device)
                return batch["image"].to(device, non_blocking=True)

            # the decoding paths agree: GPU vs PIL (resampling kernels differ slightly); grouped vs per image (equal)
            cpu_images = [d["image"] for d in itertools.islice(ShardDataset(urls[:1], transform=transform), 16)]
            raw = [d["image_bytes"] for d in itertools.islice(ShardDataset(urls[:1], raw_images=True), 16)]
            diff = (gpu_preprocess(raw, device).cpu() - torch.stack(cpu_images)).abs()
            raw = [d["image_bytes"] for d in itertools.islice(ShardDataset(urls, raw_images=True), 4 * args.batch)]
            extra["gpu_vs_cpu_mean_abs_diff"], extra["gpu_vs_cpu_max_abs_diff"] = diff.mean().item(), diff.max().item()
            grouped, per_image = gpu_preprocess(raw[:64], device), gpu_preprocess(raw[:64], device, per_image=True)
            extra["grouped_vs_per_image_max_abs_diff"] = (grouped - per_image).abs().max().item()
            extra["distinct_sizes_per_batch"] = distinct_sizes_per_batch(raw, args.batch)
            del grouped, per_image
            print({k: v for k, v in extra.items() if "diff" in k or "distinct" in k}, flush=True)

            # model only
            noise = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)
            with torch.inference_mode():
                for name, (_, run) in models.items():
                    model_rate[name] = args.batch / time_fn(lambda run=run: run(noise), warmup=3, repeats=10)
                    row("model only (eager, random tensors)", name, "-", model_rate[name], args.batch)
                if args.compile:
                    compiled = torch.compile(models[FLOAT][0])
                    rate = args.batch / time_fn(lambda: compiled(noise), warmup=3, repeats=10)
                    row("model only (compiled, random tensors)", FLOAT, "-", rate, args.batch)
                    del compiled
            elapsed("model only")

            # data only, decoding on the device
            gw = args.gpu_workers
            rate, seen = images_per_second(loader(gw, True), lambda b: gpu_preprocess.decode(b["image_bytes"], device))
            row(f"nvjpeg decode only (no resize){on}", "-", gw, rate, seen)
            for path, kw in (("per image", {"per_image": True}), ("grouped by size", {})):
                rate, seen = images_per_second(
                    loader(gw, True), lambda b, kw=kw: gpu_preprocess(b["image_bytes"], device, **kw)
                )
                row(f"gpu decode, resize {path}{on}", "-", gw, rate, seen)
            rate, seen = images_per_second(prefetched(gw), images_of)
            row(f"gpu decode, grouped + prefetch {args.prefetch_depth}{on}", "-", gw, rate, seen)
            elapsed("gpu data only")

            # end to end: plain loops
            with torch.inference_mode():
                loops = [(FLOAT, "gpu decode", lambda: loader(gw, True))]
                loops += [(name, "gpu decode + prefetch", lambda: prefetched(gw)) for name in models]
                for name, path, make in loops:
                    run = models[name][1]
                    rate, seen = images_per_second(make(), lambda b, run=run: run(images_of(b).to(dtype)))
                    row(f"end to end, loop ({path}{on} + model)", name, gw, rate, seen)
            elapsed("gpu loops")

            # end to end: trainer.validate on the datamodule, bounded in images and time
            if not args.no_lightning:
                batches = max(2, math.ceil(args.validate_images / args.batch))
                runs = [(FLOAT, True, args.prefetch_depth)]
                runs += [(QUANT, True, args.prefetch_depth), (QUANT, True, 0)] if QUANT in models else []
                runs += [(FLOAT, True, 0), (FLOAT, False, 0)]
                for name, gpu, depth in runs:
                    dm = WebDatasetDataModule(
                        root,
                        transform,
                        task="classification",
                        eval_batch_size=args.batch,
                        num_workers=gw if gpu else max(args.workers),
                        pin_memory=device == "cuda",
                        decode_on_gpu=gpu,
                        prefetch_depth=depth,
                    )
                    if not gpu:
                        path = "cpu decode"
                    elif depth and dm.prefetch_device() is not None:
                        path = f"gpu decode + prefetch {depth}"
                    elif depth:
                        path = f"gpu decode{on}, prefetch needs CUDA"
                    else:
                        path = f"gpu decode{on}, no prefetch"
                    encoder, run = models[name]
                    r = lightning_validate(dm, encoder, run, dtype, batches, args.validate_budget_s)
                    rate = r.pop("images_per_s")
                    row(f"end to end, trainer.validate ({path})", name, dm.num_workers, rate, r.pop("images"), **r)
                elapsed("trainer.validate")

            # data only and a loop, decoding on the CPU
            for workers in args.workers:
                rate, seen = images_per_second(loader(workers, raw=False), lambda b: b["image"])
                row("cpu decode (PIL + transforms)", "-", workers, rate, seen)
            with torch.inference_mode():
                best, run = max(args.workers), models[FLOAT][1]
                try:
                    rate, seen = images_per_second(loader(best, False), lambda b: run(images_of(b).to(dtype)))
                    row("end to end, loop (cpu decode + model)", FLOAT, best, rate, seen)
                except Exception as err:  # keep the table: report the failure in its row
                    traceback.print_exc()
                    row(f"end to end, loop (cpu decode + model): failed, {type(err).__name__}", FLOAT, best, 0.0, 0)
            elapsed("cpu decode")
    finally:
        faulthandler.cancel_dump_traceback_later()
        for r in rows:
            base = model_rate.get(r["model"], model_rate.get(FLOAT))
            r["ratio_to_model"] = r["images_per_s"] / base if base else float("nan")
        for name in models:
            hits = [r for r in rows if r["model"] == name and "trainer.validate (gpu decode + prefetch" in r["path"]]
            if hits:
                extra[f"validate_ratio_{'float' if name == FLOAT else 'quant_fidelity'}"] = hits[0]["ratio_to_model"]
        extra["total_s"] = time.perf_counter() - t_start
        write_results(
            f"input_pipeline_{args.model}",
            rows,
            [*COLUMNS],
            extra=extra,
        )
        ratios = {k: round(v, 3) for k, v in extra.items() if k.startswith("validate_ratio")}
        print(f"\ntrainer.validate with GPU decode + prefetch, ratio to model only (target >= 0.8): {ratios}")
        print(f"total {extra['total_s']:.0f} s")


if __name__ == "__main__":
    main()
