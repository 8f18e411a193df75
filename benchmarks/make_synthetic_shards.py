"""ImageNet-sized JPEG shards for throughput runs: the real images of a CLIP_benchmark set, repeated.

    python benchmarks/make_synthetic_shards.py SRC_ROOT OUT_ROOT --copies 10 [--shard-size 1000]

Every copy gets new keys, so the evaluation sees copies × N distinct samples with real JPEG
decoding cost; classnames / templates are copied over.
"""

from __future__ import annotations

import argparse
import io
import shutil
import tarfile
from pathlib import Path


def main() -> None:
    """Write OUT_ROOT/test/{0..}.tar with the source samples repeated ``copies`` times."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out-split", default=None, help="split name to write (default: --split)")
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--shard-size", type=int, default=1000)
    args = ap.parse_args()
    src, out = Path(args.src), Path(args.out)
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted((src / args.split).glob("*.tar"), key=lambda p: int(p.stem)):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    split = args.out_split or args.split
    (out / split).mkdir(parents=True, exist_ok=True)
    for name in ("classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    records = [fields for _ in range(args.copies) for fields in samples.values()]
    shard = 0
    for shard, start in enumerate(range(0, len(records), args.shard_size)):
        with tarfile.open(out / split / f"{shard}.tar", "w") as tar:
            for n, fields in enumerate(records[start : start + args.shard_size], start=start):
                for ext, data in fields.items():
                    info = tarfile.TarInfo(f"s{n:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    shard += 1
    n = len(records)
    (out / split / "nshards.txt").write_text(f"{shard}\n")
    print(f"wrote {n} samples ({args.copies} copies of {len(samples)}) in {shard} shards to {out / split}")


if __name__ == "__main__":
    main()
