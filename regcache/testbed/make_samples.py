"""Write the committed sample data (CLIP_benchmark layout) from the full shards.

    python -m regcache.testbed.make_samples --cifar10 ../shared/data/cifar10 \
        --imagenet ../shared/data/imagenet1k_sample

- ``cifar10_sample/test``: the first ``--test-per-class`` test images of each class (evaluation);
- ``cifar10_sample/train``: the first ``--ref-per-class`` train images of each class
  (calibration / reference; the testbed's training script leaves them out);
- ``imagenet1k_sample_small/test``: the one-per-class ImageNet sample, shorter side
  ``--imagenet-size``, re-encoded as JPEG (quality ``--jpeg-quality``).

Original sample keys are kept; class names and templates are copied.
"""

from __future__ import annotations

import argparse
import io
import shutil
from collections import defaultdict
from pathlib import Path

from PIL import Image

from regcache.testbed.data import CIFAR10_SAMPLE, IMAGENET_SAMPLE, iter_shard_samples, write_shard

META_FILES = ("classnames.txt", "zeroshot_classification_templates.txt")


def class_balanced(root: Path, split: str, per_class: int) -> list[tuple[str, bytes, int]]:
    """The first ``per_class`` samples of every class, in shard order."""
    taken: dict[int, int] = defaultdict(int)
    out = []
    for key, data, label in iter_shard_samples(root, split):
        if taken[label] < per_class:
            taken[label] += 1
            out.append((key, data, label))
    return out


def shrink_jpeg(data: bytes, shorter_side: int, quality: int) -> bytes:
    """Resize so the shorter side is ``shorter_side`` (never upscale) and re-encode as JPEG."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = shorter_side / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def write_dataset(out: Path, source: Path, splits: dict[str, list[tuple[str, bytes, int]]]) -> None:
    """One shard per split, nshards.txt, and the class names / templates of ``source``."""
    if out.exists():
        shutil.rmtree(out)
    for split, samples in splits.items():
        write_shard(out / split / "0.tar", samples)
        (out / split / "nshards.txt").write_text("1\n")
    for name in META_FILES:
        shutil.copyfile(source / name, out / name)


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cifar10", type=Path, required=True)
    p.add_argument("--imagenet", type=Path, required=True)
    p.add_argument("--test-per-class", type=int, default=50)
    p.add_argument("--ref-per-class", type=int, default=30)
    p.add_argument("--imagenet-size", type=int, default=48)
    p.add_argument("--jpeg-quality", type=int, default=85)
    args = p.parse_args(argv)
    write_dataset(
        CIFAR10_SAMPLE,
        args.cifar10,
        {
            "test": class_balanced(args.cifar10, "test", args.test_per_class),
            "train": class_balanced(args.cifar10, "train", args.ref_per_class),
        },
    )
    imagenet = [
        (k, shrink_jpeg(d, args.imagenet_size, args.jpeg_quality), y)
        for k, d, y in iter_shard_samples(args.imagenet, "test")
    ]
    write_dataset(IMAGENET_SAMPLE, args.imagenet, {"test": imagenet})
    for d in (CIFAR10_SAMPLE, IMAGENET_SAMPLE):
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        print(f"{d}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
