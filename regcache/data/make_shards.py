"""Write the CLIP_benchmark webdataset layout from an ImageFolder tree or COCO-style captions.

Usage (wired as ``regcache make-shards``)::

    make-shards imagefolder SRC_DIR OUT_ROOT [--split test] [--shard-size 1000] [--image-format webp]
                [--templates FILE] [--classnames FILE]
    make-shards coco IMAGE_DIR CAPTIONS_JSON OUT_ROOT [--karpathy dataset_coco.json] [--split test]

Keys are global ``s%07d`` indices; shards are ``<out>/<split>/{0..N-1}.tar`` plus ``nshards.txt``.
By default the original image bytes are kept (extension from the file name); ``--image-format``
re-encodes to webp / jpg / png.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tarfile
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "DEFAULT_TEMPLATES",
    "ShardWriter",
    "main",
    "write_coco_shards",
    "write_imagefolder_shards",
]

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ["a photo of a {c}.", "a bad photo of a {c}.", "a photo of the {c}.", "itap of a {c}."]
_IMG_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
_PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


class ShardWriter:
    """Write samples into ``<split_dir>/{i}.tar`` with ``shard_size`` samples per shard."""

    def __init__(self, split_dir: str | Path, shard_size: int = 1000) -> None:
        if shard_size <= 0:
            raise ValueError("shard_size must be positive")
        self.dir = Path(split_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for old in self.dir.glob("*.tar"):
            old.unlink()
        self.shard_size = shard_size
        self.count = 0
        self.nshards = 0
        self._tar: tarfile.TarFile | None = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample's members as ``<key>.<ext>`` files, starting a new tar every ``shard_size`` samples."""
        if self.count % self.shard_size == 0:
            self._close_tar()
            self._tar = tarfile.open(  # noqa: SIM115 - closed in _close_tar / close
                self.dir / f"{self.nshards}.tar", "w", format=tarfile.USTAR_FORMAT
            )
            self.nshards += 1
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def _close_tar(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def close(self) -> None:
        """Close the open tar and record the shard count in ``nshards.txt`` so readers can find every shard."""
        self._close_tar()
        (self.dir / "nshards.txt").write_text(f"{self.nshards}\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _image_member(path: Path, image_format: str | None) -> tuple[str, bytes]:
    if image_format is None:
        ext = _IMG_SUFFIXES.get(path.suffix.lower())
        if ext is None:
            raise ValueError(f"unsupported image type {path}")
        return ext, path.read_bytes()
    fmt = image_format.lower().replace("jpeg", "jpg")
    if fmt not in _PIL_FORMATS:
        raise ValueError(f"--image-format must be one of {sorted(_PIL_FORMATS)}")
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format=_PIL_FORMATS[fmt], **({"quality": 95} if fmt in ("jpg", "webp") else {}))
    return fmt, buf.getvalue()


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(f"{ln}\n" for ln in lines), encoding="utf-8")


def write_imagefolder_shards(
    src: str | Path,
    out: str | Path,
    split: str = "test",
    shard_size: int = 1000,
    image_format: str | None = None,
    templates: Sequence[str] | None = None,
    classnames: Sequence[str] | None = None,
) -> dict:
    """ImageFolder tree (``src/<class>/<image>``, classes in sorted order = label index) -> shards.

    Writes ``classnames.txt`` (folder names, or ``classnames`` in the same order), the templates file
    (``templates`` or :data:`DEFAULT_TEMPLATES`) and ``dataset_type.txt`` ("classification").
    Returns ``{"samples", "shards", "classes"}``.
    """
    src, out = Path(src), Path(out)
    classes = sorted(d.name for d in src.iterdir() if d.is_dir()) if src.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"no class sub-folders in {src} (expected an ImageFolder tree src/<class>/*.jpg)")
    if classnames is not None and len(classnames) != len(classes):
        raise ValueError(f"{len(classnames)} class names for {len(classes)} class folders")
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with ShardWriter(out / split, shard_size) as w:
        for label, cls in enumerate(classes):
            for p in sorted((src / cls).iterdir()):
                if p.suffix.lower() not in _IMG_SUFFIXES:
                    continue
                ext, data = _image_member(p, image_format)
                w.write(f"s{n:07d}", {ext: data, "cls": f"{label}\n".encode()})
                n += 1
    _write_lines(out / "classnames.txt", classnames if classnames is not None else classes)
    tpl = list(templates) if templates else DEFAULT_TEMPLATES
    bad = [t for t in tpl if "{c}" not in t]
    if bad:
        raise ValueError(f"templates without the {{c}} placeholder: {bad[:3]}")
    _write_lines(out / "zeroshot_classification_templates.txt", tpl)
    (out / "dataset_type.txt").write_text("classification\n")
    return {"samples": n, "shards": w.nshards, "classes": len(classes)}


def _coco_records(captions_json: Path | None, karpathy_json: Path | None, split: str) -> list[tuple[str, list[str]]]:
    """[(relative image path, captions)] ordered by image id / Karpathy order."""
    captions: dict[int, list[str]] = {}
    files: dict[int, str] = {}
    if captions_json is not None:
        coco = json.loads(Path(captions_json).read_text())
        files = {int(im["id"]): im["file_name"] for im in coco["images"]}
        for a in sorted(coco.get("annotations", []), key=lambda a: (a["image_id"], a.get("id", 0))):
            captions.setdefault(int(a["image_id"]), []).append(" ".join(str(a["caption"]).split()))
    if karpathy_json is None:
        return [(files[i], captions.get(i, [])) for i in sorted(files)]
    kp = json.loads(Path(karpathy_json).read_text())
    recs = []
    for im in kp["images"]:
        if im.get("split") != split:
            continue
        cid = int(im.get("cocoid", im.get("imgid", -1)))
        caps = captions[cid] if cid in captions else [" ".join(s["raw"].split()) for s in im.get("sentences", [])]
        rel = str(Path(im.get("filepath", "")) / im["filename"]) if im.get("filepath") else im["filename"]
        recs.append((files.get(cid, rel), caps))
    return recs


def write_coco_shards(
    image_dir: str | Path,
    captions_json: str | Path | None,
    out: str | Path,
    karpathy_json: str | Path | None = None,
    split: str = "test",
    shard_size: int = 1000,
    image_format: str | None = None,
    max_captions: int | None = None,
) -> dict:
    """COCO captions (``{"images": [{id, file_name}], "annotations": [{image_id, caption}]}``) + image
    dir -> retrieval shards (``.txt`` = captions, one per line). With a Karpathy split JSON only its
    ``split`` images are written (captions from the COCO file, else the Karpathy sentences).
    Writes ``dataset_type.txt`` = "retrieval". Returns ``{"samples", "shards", "captions", "missing"}``.
    """
    if captions_json is None and karpathy_json is None:
        raise ValueError("need a COCO captions JSON and/or a Karpathy split JSON")
    image_dir, out = Path(image_dir), Path(out)
    recs = _coco_records(Path(captions_json) if captions_json else None, karpathy_json and Path(karpathy_json), split)
    out.mkdir(parents=True, exist_ok=True)
    n = ncap = missing = 0
    with ShardWriter(out / split, shard_size) as w:
        for rel, caps in recs:
            p = image_dir / rel
            if not p.is_file():
                p = image_dir / Path(rel).name
            caps = caps[:max_captions] if max_captions else caps
            if not p.is_file() or not caps:
                missing += 1
                log.warning("skipping %s (%s)", rel, "no file" if not p.is_file() else "no captions")
                continue
            ext, data = _image_member(p, image_format)
            w.write(f"s{n:07d}", {ext: data, "txt": "\n".join(caps).encode("utf-8")})
            n += 1
            ncap += len(caps)
    (out / "dataset_type.txt").write_text("retrieval\n")
    return {"samples": n, "shards": w.nshards, "captions": ncap, "missing": missing}


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regcache make-shards", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="source", required=True)

    def common(sp):
        sp.add_argument("--split", default="test", help="split folder name (default: test)")
        sp.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
        sp.add_argument(
            "--image-format", choices=["webp", "jpg", "png"], default=None,
            help="re-encode images (default: keep the original bytes)",
        )  # fmt: skip

    f = sub.add_parser("imagefolder", help="ImageFolder tree -> classification shards")
    f.add_argument("src", help="root with one sub-folder per class")
    f.add_argument("out", help="output dataset root")
    f.add_argument("--templates", help="file with one zero-shot template per line ({c} placeholder)")
    f.add_argument("--classnames", help="file with one class name per line (sorted folder order)")
    common(f)
    c = sub.add_parser("coco", help="COCO-style captions JSON + image dir -> retrieval shards")
    c.add_argument("image_dir")
    c.add_argument("captions_json", nargs="?", default=None, help="COCO captions JSON (optional with --karpathy)")
    c.add_argument("out")
    c.add_argument("--karpathy", help="Karpathy split JSON (dataset_coco.json): write its --split images")
    c.add_argument("--max-captions", type=int, default=None, help="keep at most this many captions per image")
    common(c)
    return p


def _read_lines(path: str | None) -> list[str] | None:
    if path is None:
        return None
    return [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def main(argv: list[str] | None = None) -> int:
    """Run ``regcache make-shards``: write the shards, print a JSON summary, return 2 on bad input else 0."""
    args = _build_parser().parse_args(argv)
    try:
        if args.source == "imagefolder":
            res = write_imagefolder_shards(
                args.src, args.out, args.split, args.shard_size, args.image_format,
                templates=_read_lines(args.templates), classnames=_read_lines(args.classnames),
            )  # fmt: skip
        else:
            res = write_coco_shards(
                args.image_dir, args.captions_json, args.out, args.karpathy, args.split,
                args.shard_size, args.image_format, args.max_captions,
            )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        print(f"make-shards: error: {e}")
        return 2
    print(json.dumps({"out": str(args.out), "split": args.split, **res}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
