"""Shared benchmark helpers: models at their real shapes, proper GPU timing, result tables."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

# ViT shapes of the paper's encoders (random weights: speed does not depend on their values)
VISION_MODELS = {
    "openclip-b16": ("ViT-B-16", 224),
    "siglip2-b16": ("ViT-B-16-SigLIP2", 224),
    "dinov2-b14": ("timm:vit_base_patch14_dinov2", 224),
}


def vision_encoder(key: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """A randomly initialised adapted vision tower of one of the paper's shapes."""
    from regcache.encoders import adapt
    from regcache.loading import load_model

    name, size = VISION_MODELS[key]
    if name.startswith("timm:"):
        model = load_model(name, image_size=size).model
    else:
        import open_clip

        model = open_clip.create_model(name).visual
    torch.manual_seed(0)
    return adapt(model).to(device=device, dtype=dtype).eval(), size


def device_name() -> str:
    """The accelerator's name, or the CPU's."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def sync() -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of fn() in seconds, synchronising the GPU around each call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_gib() -> float:
    """Peak allocated GPU memory since the last reset, GiB."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak_memory() -> None:
    """Reset the GPU peak-memory counter."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def commit() -> str:
    """Short git commit of the working tree ('unknown' outside a checkout)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as a Markdown table (floats to 3 significant decimals)."""

    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(name: str, rows: list[dict[str, Any]], columns: list[str], extra: dict | None = None) -> Path:
    """Write JSON (to $OUT if set, else benchmarks/results/) and print the table last."""
    out_dir = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "benchmark": name,
        "device": device_name(),
        "torch": torch.__version__,
        "commit": commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"\n## {name} — {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}\n")
    print(markdown_table(rows, columns))
    return path
