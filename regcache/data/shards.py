"""Shard discovery and dataset metadata for the CLIP_benchmark webdataset layout.

Layout::

    <root>/<split>/{0..N-1}.tar
    <root>/<split>/nshards.txt
    <root>/classnames.txt
    <root>/zeroshot_classification_templates.txt   (placeholder {c})
    <root>/dataset_type.txt                        ("retrieval" for caption sets)

``root`` may be a local directory, a ``file://`` URL, an ``http(s)://`` URL or anything else that
``webdataset.gopen`` opens (``pipe:`` commands are accepted as explicit shard patterns).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import braceexpand

__all__ = [
    "DatasetInfo",
    "DatasetLayoutError",
    "ShardSourceError",
    "expand_pattern",
    "is_remote",
    "open_stream",
    "parse_nshards",
    "read_dataset_info",
    "read_text",
    "resolve_split_shards",
]

_MAKE_SHARDS_HINT = (
    "Expected the CLIP_benchmark layout <root>/<split>/{0..N-1}.tar (+ nshards.txt); create it with "
    "`regcache make-shards` (regcache.data.make_shards) or pass an explicit shard pattern, e.g. "
    "shards='/data/imagenet/test/{0..63}.tar' or 'pipe:curl -s https://host/test/{0..63}.tar'."
)


class ShardSourceError(FileNotFoundError):
    """Missing dataset root / split / shards. The message names the pattern and how to fix it."""


class DatasetLayoutError(ValueError):
    """A metadata file of a dataset root that cannot be used; the message names the file and the fix."""


CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


def parse_nshards(text: str, path: str) -> int:
    """The shard count written in ``nshards.txt`` (at ``path``); a clear error unless it is an integer >= 1."""
    value = text.strip()
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise DatasetLayoutError(
            f"{path}: expected the number of shards of the split (an integer >= 1, the tars being "
            f"{{0..N-1}}.tar beside it), got {value[:40]!r}; write that count into it, or delete it "
            "to use every *.tar of a local split (`regcache make-shards` writes it)"
        )
    return n


def is_remote(url: str) -> bool:
    """True for anything that is not a plain local path (``http://``, ``pipe:``, ``s3://`` ...)."""
    if url.startswith("pipe:"):
        return True
    scheme = urlparse(url).scheme
    return scheme not in ("", "file") and not (len(scheme) == 1 and os.name == "nt")


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file://") else url


def expand_pattern(pattern: str | list[str] | tuple[str, ...]) -> list[str]:
    """Brace-expand a shard pattern (``a/{0..9}.tar``) or a ``::``-separated list of patterns."""
    if isinstance(pattern, (list, tuple)):
        out: list[str] = []
        for p in pattern:
            out.extend(expand_pattern(p))
        return out
    out = []
    for part in str(pattern).split("::"):
        if part:
            out.extend(braceexpand.braceexpand(part))
    return out


def open_stream(url: str) -> IO[bytes]:
    """Open a shard / metadata file for binary reading (local path, file://, http(s), pipe:...)."""
    if not is_remote(url):
        return open(_local_path(url), "rb")
    import webdataset as wds

    return wds.gopen(url, "rb")


def read_text(url: str) -> str | None:
    """Read a small text file; None when it does not exist / cannot be fetched."""
    try:
        if not is_remote(url):
            p = Path(_local_path(url))
            return p.read_text(encoding="utf-8") if p.is_file() else None
        with open_stream(url) as f:
            return f.read().decode("utf-8")
    except Exception:
        return None


def _join(root: str, *parts: str) -> str:
    if is_remote(root) or root.startswith("file://"):
        return "/".join([root.rstrip("/"), *parts])
    return str(Path(root, *parts))


def _numeric_tar_key(p: Path):
    m = re.match(r"^(\d+)$", p.stem)
    return (0, int(m.group(1)), "") if m else (1, 0, p.name)


def resolve_split_shards(
    root: str | os.PathLike | None, split: str, shards: str | list[str] | None = None
) -> list[str]:
    """Return the ordered list of shard URLs of ``split``.

    ``shards`` (a brace pattern or a list) overrides discovery. Otherwise ``<root>/<split>/`` is read:
    ``nshards.txt`` gives N and shards are ``{0..N-1}.tar``; for a local directory without
    ``nshards.txt`` every ``*.tar`` is used (numeric names in numeric order).
    Raises :class:`ShardSourceError` naming the pattern when nothing is found.
    """
    if shards is not None:
        urls = expand_pattern(shards)
        if not urls:
            raise ShardSourceError(f"Shard pattern {shards!r} expands to no shards. {_MAKE_SHARDS_HINT}")
        missing = [u for u in urls if not is_remote(u) and not Path(_local_path(u)).is_file()]
        if missing:
            raise ShardSourceError(
                f"{len(missing)} of {len(urls)} shards of pattern {shards!r} do not exist "
                f"(first: {missing[0]!r}). {_MAKE_SHARDS_HINT}"
            )
        return urls
    if root is None:
        raise ShardSourceError(f"No dataset root and no shard pattern given for split {split!r}. {_MAKE_SHARDS_HINT}")
    root = str(root)
    split_dir = _join(root, split)
    nshards_txt = read_text(_join(split_dir, "nshards.txt"))
    if nshards_txt is not None:
        n = parse_nshards(nshards_txt, _join(split_dir, "nshards.txt"))
        pattern = _join(split_dir, f"{{0..{n - 1}}}.tar")
        return resolve_split_shards(None, split, pattern)
    if is_remote(root):
        raise ShardSourceError(
            f"Could not read {_join(split_dir, 'nshards.txt')!r} for remote split {split!r}; "
            f"pass shards='{_join(split_dir, '{0..N-1}.tar')}' explicitly. {_MAKE_SHARDS_HINT}"
        )
    d = Path(_local_path(split_dir))
    tars = sorted(d.glob("*.tar"), key=_numeric_tar_key) if d.is_dir() else []
    if not tars:
        what = "does not exist" if not Path(_local_path(root)).exists() else f"has no {split}/*.tar shards"
        raise ShardSourceError(
            f"Dataset root {root!r} {what} (looked for pattern {_join(split_dir, '{0..N-1}.tar')!r}). "
            f"{_MAKE_SHARDS_HINT}"
        )
    return [str(t) for t in tars]


@dataclass
class DatasetInfo:
    """Metadata of a dataset root."""

    root: str | None
    dataset_type: str = "classification"  # or "retrieval"
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of class names read from ``classnames.txt`` (0 when the file is missing, as for retrieval sets)."""
        return len(self.classnames)

    def zeroshot_texts(self) -> tuple[list[str], list[str]]:
        """Class names and templates for a zero-shot head; a clear error naming the file where one is missing."""
        where = self.root if self.root is not None else "<no dataset root>"
        if not self.classnames:
            raise DatasetLayoutError(
                f"{_join(where, CLASSNAMES_FILE)} is missing: zero-shot classification needs the class names, "
                "one per line in label order (`regcache make-shards imagefolder` writes it; a caption set "
                "needs 'retrieval' in dataset_type.txt instead)"
            )
        if not self.templates:
            raise DatasetLayoutError(
                f"{_join(where, TEMPLATES_FILE)} is missing or empty: zero-shot classification needs prompt "
                "templates, one per line with {c} for the class name (e.g. 'a photo of a {c}.'; "
                "`regcache make-shards imagefolder` writes CLIP's)"
            )
        bad = [t for t in self.templates if "{c}" not in t]
        if bad:
            raise DatasetLayoutError(
                f"{_join(where, TEMPLATES_FILE)}: {len(bad)} template(s) without the {{c}} placeholder "
                f"(first: {bad[0]!r}) would give every class the same prompt; put {{c}} where the class name goes"
            )
        return list(self.classnames), list(self.templates)


def _lines(text: str | None) -> list[str]:
    if text is None:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def read_dataset_info(root: str | os.PathLike | None) -> DatasetInfo:
    """Read ``dataset_type.txt``, ``classnames.txt`` and the templates file (all optional)."""
    if root is None:
        return DatasetInfo(root=None)
    root = str(root)
    dtype = (read_text(_join(root, "dataset_type.txt")) or "").strip().lower() or None
    classnames_text = read_text(_join(root, CLASSNAMES_FILE))
    classnames = _lines(classnames_text)
    templates = _lines(read_text(_join(root, TEMPLATES_FILE)))
    if dtype is None:
        dtype = "classification"
    if classnames_text is not None and not classnames and dtype == "classification":
        raise DatasetLayoutError(
            f"{_join(root, CLASSNAMES_FILE)} is empty: write the class names into it, one per line in label "
            "order (line i names label i; `regcache make-shards imagefolder` writes it), or delete it for a "
            "caption set and write 'retrieval' into dataset_type.txt"
        )
    if dtype not in ("classification", "retrieval"):
        raise DatasetLayoutError(
            f"{_join(root, 'dataset_type.txt')}: unknown dataset type {dtype!r}; write 'classification' or 'retrieval'"
        )
    return DatasetInfo(root=root, dataset_type=dtype, classnames=classnames, templates=templates)
