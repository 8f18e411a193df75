"""ImageNet-sized JPEG shards for throughput runs: the real images of a CLIP_benchmark set, repeated.

    python benchmarks/make_synthetic_shards.py SRC_ROOT OUT_ROOT --copies 10 [--shard-size 1000]
        [--short-side 375 --quality 90] [--limit N]

Every copy gets new keys, so the evaluation sees copies × N distinct samples with real JPEG
decoding cost; classnames / templates are copied over. ``--short-side`` re-encodes every image
with that shorter side (bicubic, JPEG ``--quality``) first: the ImageNet sample's JPEGs have a
shorter side of 256, full-resolution ImageNet validation images are mostly 500 × 375 (~110 KB).
"""

from __future__ import annotations

import argparse
import io
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

IMAGE_EXTS = ("jpg", "jpeg", "webp", "png")


def reencode(data: bytes, short_side: int, quality: int) -> bytes:
    """The image resized to the given shorter side (bicubic) as a JPEG of the given quality."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = short_side / min(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _reencode_args(args: tuple[bytes, int, int]) -> bytes:
    return reencode(*args)


def read_samples(src: Path, split: str) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of every sample of ``src/split/*.tar``."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted((src / split).glob("*.tar"), key=lambda p: int(p.stem)):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def write_shards(
    src: str | Path,
    out: str | Path,
    copies: int = 10,
    shard_size: int = 1000,
    split: str = "test",
    out_split: str | None = None,
    short_side: int | None = None,
    quality: int = 90,
    limit: int | None = None,
    processes: int | None = None,
) -> tuple[int, int]:
    """Write ``out/<out_split>/{0..}.tar`` (+ nshards.txt, metadata); returns (samples, shards)."""
    src, out = Path(src), Path(out)
    samples = read_samples(src, split)
    if limit is not None and limit < len(samples):  # no need to re-encode what is not written
        samples = dict(list(samples.items())[:limit])
    if short_side:
        items = [(key, ext) for key, fields in samples.items() for ext in fields if ext in IMAGE_EXTS]
        with ProcessPoolExecutor(processes) as pool:
            encoded = pool.map(_reencode_args, [(samples[k][e], short_side, quality) for k, e in items], chunksize=16)
            for (key, ext), data in zip(items, encoded, strict=True):
                del samples[key][ext]
                samples[key]["jpg"] = data
    split_dir = out / (out_split or split)
    split_dir.mkdir(parents=True, exist_ok=True)
    for name in ("classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    records = [fields for _ in range(copies) for fields in samples.values()][:limit]
    shards = 0
    for shards, start in enumerate(range(0, len(records), shard_size), start=1):
        with tarfile.open(split_dir / f"{shards - 1}.tar", "w") as tar:
            for n, fields in enumerate(records[start : start + shard_size], start=start):
                for ext, data in fields.items():
                    info = tarfile.TarInfo(f"s{n:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (split_dir / "nshards.txt").write_text(f"{shards}\n")
    return len(records), shards


def main() -> None:
    """Write OUT_ROOT/test/{0..}.tar with the source samples repeated ``copies`` times."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out-split", default=None, help="split name to write (default: --split)")
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--short-side", type=int, default=None, help="re-encode images at this shorter side")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    ap.add_argument("--limit", type=int, default=None, help="write at most this many samples")
    args = ap.parse_args()
    n, shards = write_shards(
        args.src,
        args.out,
        args.copies,
        args.shard_size,
        args.split,
        args.out_split,
        args.short_side,
        args.quality,
        args.limit,
    )
    where = Path(args.out) / (args.out_split or args.split)
    print(f"wrote {n} samples ({args.copies} copies) in {shards} shards to {where}")


if __name__ == "__main__":
    main()
