"""Input pipeline: JPEG decode + preprocessing (CPU workers, GPU nvJPEG) against the model's own speed.

Workload 4 of the benchmark suite. Builds ``--images`` realistic JPEG samples (the ImageNet
one-per-class sample re-encoded at ImageNet-validation resolution, shorter side ``--short-side``,
repeated) in tar shards under a temporary directory, then measures images/s of

* ``cpu decode``: the datamodule's loader (PIL decode + open_clip ViT-B/16 eval preprocessing) with
  each of ``--workers``, data only;
* ``gpu decode``: workers pass the JPEG bytes, batches are decoded with ``decode_jpeg(device="cuda")``
  and resized / cropped / normalized on the GPU (``decode_on_gpu=True``), data only;
* ``model only``: the ViT-B/16 vision tower (random weights, ``--dtype``) on random tensors of
  ``--batch`` images (median of 10; ``--compile`` adds the compiled model);
* ``end to end``: a plain loop over each loader feeding the model, and ``trainer.validate`` of a
  minimal LightningModule on the datamodule (its wall time includes the worker start-up).

``ratio`` = images/s ÷ model-only images/s (the target: end to end ≥ 0.8, i.e. compute-bound).
Data-only and loop rates exclude the first batch (worker start-up); ``trainer.validate`` does not.

    python benchmarks/bench_input_pipeline.py [--src .bench/data/imagenet1k_sample] [--images 10000]
    python benchmarks/bench_input_pipeline.py --tiny     # CPU smoke test: 48 images, tiny model
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import sync, time_fn, vision_encoder, write_results
from make_synthetic_shards import read_samples, write_shards

REPO = Path(__file__).resolve().parents[1]


def build_shards(src: Path, out: Path, images: int, short_side: int | None, quality: int, shards: int) -> int:
    """``images`` samples of ``src``'s test split, repeated, re-encoded, in ``shards`` shards; returns the count."""
    per_copy = len(read_samples(src, "test"))
    copies = math.ceil(images / per_copy)
    shard_size = math.ceil(images / shards)
    n, _ = write_shards(src, out, copies, shard_size, short_side=short_side, quality=quality, limit=images)
    return n


def images_per_second(batches: Iterable[dict], consume: Callable[[dict], None]) -> tuple[float, int]:
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


def main() -> None:
    """Build the shards, time every path and print the table last."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(REPO / ".bench" / "data" / "imagenet1k_sample"))
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--short-side", type=int, default=375, help="0 keeps the source resolution")
    ap.add_argument("--quality", type=int, default=95)
    ap.add_argument("--shards", type=int, default=56, help="shard count (56: whole shards for 4, 8 and 14 workers)")
    ap.add_argument("--workers", type=int, nargs="*", default=[4, 8, 14])
    ap.add_argument("--gpu-workers", type=int, default=4, help="workers of the GPU-decode loader (read bytes only)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--model", default="openclip-b16")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true", help="also time the compiled model (model only)")
    ap.add_argument("--no-lightning", action="store_true", help="skip the trainer.validate runs")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: 48 images, a tiny model, 0/2 workers")
    args = ap.parse_args()
    if args.tiny:
        args.images, args.workers, args.gpu_workers, args.batch, args.model = 48, [0, 2], 2, 16, "tiny"
        args.short_side, args.shards = 300, 4
    import open_clip

    from datamodules import WebDatasetDataModule
    from regcache.data.gpu_decode import TensorPreprocess
    from regcache.data.reader import ShardDataset, collate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if device == "cuda" else torch.float32
    if args.model == "tiny":
        from regcache.encoders import adapt
        from regcache.loading import load_model

        torch.manual_seed(0)
        encoder, size = adapt(load_model("regcache-tiny-vit").model.visual).to(device, dtype).eval(), 64
    else:
        encoder, size = vision_encoder(args.model, device, dtype)
    transform = open_clip.image_transform(
        size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD
    )
    gpu_preprocess = TensorPreprocess.from_transform(transform)
    rows: list[dict] = []

    def row(path: str, workers: int | str, rate: float, images: int, seconds: float | None = None) -> None:
        rows.append({"path": path, "workers": workers, "images": images, "images_per_s": rate})
        if seconds is not None:
            rows[-1]["seconds"] = seconds
        print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory(prefix="regcache-pipeline-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        n = build_shards(Path(args.src), root, args.images, args.short_side or None, args.quality, args.shards)
        urls = sorted(str(p) for p in (root / "test").glob("*.tar"))
        avg_kb = sum(Path(u).stat().st_size for u in urls) / n / 1024
        print(f"{n} samples in {len(urls)} shards ({avg_kb:.0f} KB each) in {time.perf_counter() - start:.1f} s")

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

        def to_model_input(batch: dict) -> torch.Tensor:
            if "image_bytes" in batch:
                return gpu_preprocess(batch["image_bytes"], device).to(dtype)
            return batch["image"].to(device, dtype, non_blocking=True)

        # the two decoding paths agree (resampling kernels differ slightly)
        cpu_images = [d["image"] for d in itertools.islice(ShardDataset(urls[:1], transform=transform), 16)]
        raw = [d["image_bytes"] for d in itertools.islice(ShardDataset(urls[:1], raw_images=True), 16)]
        diff = (gpu_preprocess(raw, device).cpu() - torch.stack(cpu_images)).abs()
        agreement = {"gpu_vs_cpu_mean_abs_diff": diff.mean().item(), "gpu_vs_cpu_max_abs_diff": diff.max().item()}
        print(agreement, flush=True)

        # (c) model only
        x = torch.randn(args.batch, 3, size, size, device=device, dtype=dtype)
        with torch.no_grad():
            model_rate = args.batch / time_fn(lambda: encoder(x), warmup=3, repeats=10)
            row("model only (eager, random tensors)", "-", model_rate, args.batch)
            if args.compile:
                compiled = torch.compile(encoder)
                rate = args.batch / time_fn(lambda: compiled(x), warmup=3, repeats=10)
                row("model only (compiled, random tensors)", "-", rate, args.batch)
                del compiled

        # (a) CPU decode, (b) GPU decode: data only
        for workers in args.workers:
            rate, seen = images_per_second(loader(workers, raw=False), lambda b: b["image"])
            row("cpu decode (PIL + transforms)", workers, rate, seen)
        rate, seen = images_per_second(loader(args.gpu_workers, raw=True), to_model_input)
        row(f"gpu decode (decode_jpeg on {device})", args.gpu_workers, rate, seen)

        # (d) end to end: a plain loop
        best = max(args.workers)
        with torch.no_grad():
            for name, workers, raw in (("cpu", best, False), ("gpu", args.gpu_workers, True)):
                rate, seen = images_per_second(loader(workers, raw), lambda b: encoder(to_model_input(b)))
                row(f"end to end, loop ({name} decode + model)", workers, rate, seen)

        # (d) end to end: trainer.validate on the datamodule (decode_on_gpu through on_after_batch_transfer)
        if not args.no_lightning:
            for name, workers, raw in (("cpu", best, False), ("gpu", args.gpu_workers, True)):
                seen, seconds = lightning_validate(
                    WebDatasetDataModule(
                        root,
                        transform,
                        task="classification",
                        eval_batch_size=args.batch,
                        num_workers=workers,
                        pin_memory=device == "cuda",
                        decode_on_gpu=raw,
                    ),
                    encoder,
                    dtype,
                )
                row(f"end to end, trainer.validate ({name} decode)", workers, seen / seconds, seen, seconds)

    for r in rows:
        r["ratio_to_model"] = r["images_per_s"] / model_rate
    write_results(
        f"input_pipeline_{args.model}",
        rows,
        ["path", "workers", "images", "images_per_s", "ratio_to_model", "seconds"],
        extra={
            "batch": args.batch,
            "dtype": str(dtype),
            "short_side": args.short_side,
            "avg_jpeg_kb": avg_kb,
            **agreement,
        },
    )


def lightning_validate(datamodule, encoder: torch.nn.Module, dtype: torch.dtype) -> tuple[int, float]:
    """(images, wall seconds) of ``trainer.validate`` of a module that only runs the encoder."""
    from regcache._lightning import pl

    class Forward(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.seen = 0

        def validation_step(self, batch, batch_idx):
            self.encoder(batch["image"].to(dtype))
            self.seen += len(batch["key"])

    module = Forward()
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    sync()
    start = time.perf_counter()
    trainer.validate(module, datamodule=datamodule, verbose=False)
    sync()
    return module.seen, time.perf_counter() - start


if __name__ == "__main__":
    main()
