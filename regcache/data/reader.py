"""Streaming reader of CLIP_benchmark webdataset shards (plain PyTorch ``IterableDataset``).

Each yielded sample is a dict::

    image      float tensor (3, H, W)       -- output of the encoder's own transform
    image_bytes bytes                       -- instead of ``image`` with ``raw_images=True``: the encoded
                                               image, decoded later as a batch (e.g. on the GPU, see
                                               :mod:`regcache.data.gpu_decode`)
    label      int                          -- classification (``.cls``)
    captions   list[str]                    -- retrieval (``.txt``, one caption per line)
    sample_id  int                          -- global id, see :func:`make_sample_id`
    key        str                          -- the ``__key__`` inside the shard (e.g. ``s0000123``)

:func:`collate` turns a list of them into the batch dict (``image`` (B,3,H,W), ``label`` (B,) long,
``sample_id`` (B,) long, ``key`` list[str], ``captions`` list[list[str]]; ``image_bytes``
(:class:`EncodedImages`, the encoded images as one opaque object) in place of ``image`` for raw images).

Corrupt / undecodable samples are skipped and counted in a :class:`SkipCounter` shared with
dataloader worker processes. A shard that cannot be read to its end (truncated, corrupt tar, failed
open) raises :class:`ShardReadError` naming it, unless ``tolerate_shard_errors``: then the rest of
that shard is skipped and the error recorded per shard (samples read, samples lost where known).
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import torch
from PIL import Image

from .shards import open_stream
from .splitting import Assignment, ShardPart, assign_work, current_consumer

__all__ = [
    "IMAGE_EXTS",
    "CanonicalBatches",
    "EncodedImages",
    "ShardDataset",
    "ShardReadError",
    "SkipCounter",
    "collate",
    "default_transform",
    "iter_tar_samples",
    "make_sample_id",
    "shard_error_report",
    "split_sample_id",
]

log = logging.getLogger(__name__)

IMAGE_EXTS = ("webp", "jpg", "jpeg", "png")
_KEY_DIGITS = re.compile(r"(\d+)$")
_LOCAL_BITS = 32
_POSITION_FLAG = 1 << 31


def make_sample_id(shard_index: int, key: str, position: int) -> int:
    """Global sample id: ``shard_index << 32 | local``.

    ``local`` is the number at the end of the key (CLIP_benchmark keys ``s0000123`` -> 123) when it is
    below 2**31, else ``2**31 + position`` (position of the sample inside its shard). Unique across
    the dataset because the shard index is part of it; stable across runs, ranks and workers.
    """
    m = _KEY_DIGITS.search(key)
    local = int(m.group(1)) if m is not None and int(m.group(1)) < _POSITION_FLAG else _POSITION_FLAG + position
    return (int(shard_index) << _LOCAL_BITS) | local


def split_sample_id(sample_id: int) -> tuple[int, int]:
    """Inverse of :func:`make_sample_id`: (shard_index, local)."""
    sample_id = int(sample_id)
    return sample_id >> _LOCAL_BITS, sample_id & ((1 << _LOCAL_BITS) - 1)


class ShardReadError(RuntimeError):
    """A shard could not be read to its end (truncated or corrupt tar, failed open)."""


# per failed shard read: (shard index, samples read before the error, samples lost or -1 = unknown)
_RECORD_FIELDS = 3


class SkipCounter:
    """Counts skipped samples and failed shard reads across dataloader worker processes.

    Each failed shard read is also recorded (shard index, samples read, samples lost) in shared
    memory, up to ``max_records`` of them; :attr:`shard_errors` counts them all.
    """

    def __init__(self, max_records: int = 4096) -> None:
        self._skipped = mp.Value("q", 0)
        self._shard_errors = mp.Value("q", 0)
        self._records = mp.Array("q", max_records * _RECORD_FIELDS, lock=False)  # written under _shard_errors' lock
        self.max_records = max_records

    def add_skipped(self, n: int = 1) -> None:
        """Count ``n`` more skipped samples, atomically across worker processes."""
        with self._skipped.get_lock():
            self._skipped.value += n

    def add_shard_error(
        self, n: int = 1, shard: int = -1, samples_read: int = 0, samples_lost: int | None = None
    ) -> None:
        """Count ``n`` more failed shard reads; with ``shard`` (its index) also record one with its sample counts."""
        with self._shard_errors.get_lock():
            i = self._shard_errors.value
            if shard >= 0 and i < self.max_records:
                lost = -1 if samples_lost is None else samples_lost
                self._records[i * _RECORD_FIELDS : (i + 1) * _RECORD_FIELDS] = [shard, samples_read, lost]
            self._shard_errors.value += n

    def shard_error_records(self) -> list[tuple[int, int, int | None]]:
        """``(shard index, samples read, samples lost or None = unknown)`` of each recorded failed shard read."""
        with self._shard_errors.get_lock():
            n = min(self._shard_errors.value, self.max_records)
            flat = list(self._records[: n * _RECORD_FIELDS])
        rows = [flat[i : i + _RECORD_FIELDS] for i in range(0, len(flat), _RECORD_FIELDS)]
        return [(s, read, None if lost < 0 else lost) for s, read, lost in rows if s >= 0]

    @property
    def skipped(self) -> int:
        """Samples skipped so far by all processes sharing this counter."""
        return int(self._skipped.value)

    @property
    def shard_errors(self) -> int:
        """Shard read errors so far by all processes sharing this counter."""
        return int(self._shard_errors.value)

    def reset(self) -> None:
        """Zero both counts, e.g. before a new pass over the data."""
        with self._skipped.get_lock():
            self._skipped.value = 0
        with self._shard_errors.get_lock():
            self._shard_errors.value = 0

    def as_dict(self) -> dict[str, int]:
        """Both counts under the keys reported in the run's metrics (``skipped_samples``, ``shard_errors``)."""
        return {"skipped_samples": self.skipped, "shard_errors": self.shard_errors}


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset convention: key = dir + basename up to the first dot, ext = the rest (lower case)."""
    slash = name.rfind("/")
    base = name[slash + 1 :]
    dot = base.find(".")
    if dot <= 0:
        return None
    return name[: slash + 1] + base[:dot], base[dot + 1 :].lower()


class _TailReader:
    """Read-through wrapper remembering the first and the last bytes read (truncation check)."""

    _COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")

    def __init__(self, stream) -> None:
        self.stream = stream
        self.head = b""
        self.tail = b""
        self.nbytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        if len(self.head) < 8:
            self.head = (self.head + data)[:8]
        self.tail = (self.tail + data)[-1024:] if len(data) < 1024 else data[-1024:]
        self.nbytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 16):
            pass

    def looks_truncated(self) -> bool:
        """A plain tar ends with two zero blocks; a stream cut at a header boundary does not (tarfile
        silently stops there). Not checked for compressed streams."""
        if self.head.startswith(self._COMPRESSED_MAGIC) or self.nbytes == 0:
            return False
        return len(self.tail) < 1024 or any(self.tail)


def iter_tar_samples(stream: IO[bytes], on_error: Callable[[BaseException], None] | None = None) -> Iterator[dict]:
    """Group the members of a tar stream by key. Yields ``{"__key__", "__pos__", ext: bytes, ...}``.

    A read error (truncated / corrupt tar) ends the shard: ``on_error`` is called (else re-raised).
    A stream that ends without the end-of-archive marker also counts as an error (reported after
    its complete samples were yielded).
    """
    current: dict[str, Any] | None = None
    pos = 0
    reader = _TailReader(stream)
    try:
        with tarfile.open(fileobj=reader, mode="r|*") as tf:
            for member in tf:
                if not member.isreg():
                    continue
                parts = _split_name(member.name)
                if parts is None or parts[0].rsplit("/", 1)[-1].startswith("__"):
                    continue
                key, ext = parts
                f = tf.extractfile(member)
                data = f.read() if f is not None else b""
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                        pos += 1
                    current = {"__key__": key, "__pos__": pos}
                current[ext] = data
        reader.drain()
        if reader.looks_truncated():
            raise tarfile.ReadError("tar stream ends without the end-of-archive marker (truncated?)")
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        if on_error is None:
            raise
        on_error(e)
        return  # drop the possibly incomplete last sample
    if current is not None:
        yield current


def default_transform(size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """Resize (bicubic) + center crop + ToTensor, *without* normalisation. Prefer the encoder's own."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor()])


class ShardDataset(torch.utils.data.IterableDataset):
    """Iterate the samples of a list of shards, split across ranks x dataloader workers exactly once.

    Args:
        urls: ordered shard URLs (index in this list = shard index of the sample ids).
        transform: callable ``PIL.Image -> tensor`` (the encoder's preprocessing).
        task: ``"classification"`` (needs ``.cls``) or ``"retrieval"`` (needs ``.txt``).
        select: optional set of ``(shard_index, key)``: read only these samples (a drawn subset).
            They are split across consumers round-robin in sorted order.
        exclude: optional set of ``(shard_index, key)`` never yielded (e.g. calibration samples drawn
            from the evaluation split).
        split_by_rank: split across distributed ranks (evaluation). ``False`` gives every rank the full
            set (still split across the workers of a rank), e.g. for calibration.
        rank, world_size: fixed at dataloader-construction time by the datamodule; ``None`` means read
            torch.distributed / env when iterating.
        counter: shared :class:`SkipCounter` (created if not given).
        raw_images: yield the encoded image bytes (``image_bytes``) instead of decoding and
            transforming them (``transform`` unused); undecodable images are then not skipped here.
        tolerate_shard_errors: a shard that cannot be read to its end raises :class:`ShardReadError`
            (default); ``True`` skips the rest of it and records the error in ``counter``
            (:meth:`shard_error_report`).
    """

    def __init__(
        self,
        urls: list[str],
        transform: Callable | None = None,
        task: str = "classification",
        select: Iterable[tuple[int, str]] | None = None,
        exclude: Iterable[tuple[int, str]] | None = None,
        split_by_rank: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        image_exts: tuple[str, ...] = IMAGE_EXTS,
        counter: SkipCounter | None = None,
        max_warnings: int = 10,
        raw_images: bool = False,
        tolerate_shard_errors: bool = False,
    ) -> None:
        super().__init__()
        self.raw_images = raw_images
        self.tolerate_shard_errors = tolerate_shard_errors
        if task not in ("classification", "retrieval"):
            raise ValueError(f"task must be 'classification' or 'retrieval', got {task!r}")
        self.urls = list(urls)
        self.transform = transform if transform is not None else default_transform()
        self.task = task
        self.select = None if select is None else frozenset((int(s), str(k)) for s, k in select)
        self.exclude = frozenset((int(s), str(k)) for s, k in (exclude or ()))
        self.split_by_rank = split_by_rank
        self.rank = rank
        self.world_size = world_size
        self.image_exts = tuple(image_exts)
        self.counter = counter if counter is not None else SkipCounter()
        self.max_warnings = max_warnings
        self._warned = 0

    # ------------------------------------------------------------------ work assignment
    def _consumer(self) -> tuple[int, int, int, int]:
        rank, world, worker, nw = current_consumer(self.split_by_rank)
        if self.split_by_rank and self.rank is not None:
            rank, world = self.rank, self.world_size or 1
        return rank, world, worker, nw

    def plan(
        self, rank: int, world: int, worker: int, num_workers: int, warn: bool = True
    ) -> list[tuple[ShardPart, frozenset[str] | None]]:
        """List of (ShardPart, wanted_keys | None) for one consumer (public for tests)."""
        if self.select is None:
            warn = warn and rank == 0 and worker == 0
            a: Assignment = assign_work(len(self.urls), rank, world, worker, num_workers, warn=warn)
            return [(p, None) for p in a.parts]
        nw = max(num_workers, 1)
        consumers, c = world * nw, rank * nw + worker
        mine = sorted(self.select)[c::consumers]
        by_shard: dict[int, set[str]] = {}
        for s, k in mine:
            by_shard.setdefault(s, set()).add(k)
        return [(ShardPart(s), frozenset(keys)) for s, keys in sorted(by_shard.items())]

    # ------------------------------------------------------------------ decoding
    def _warn(self, msg: str) -> None:
        if self._warned < self.max_warnings:
            log.warning(msg)
            self._warned += 1
            if self._warned == self.max_warnings:
                log.warning("further skipped-sample warnings of this reader are suppressed")

    def decode(self, raw: dict, shard_index: int) -> dict:
        """Turn one tar sample's members into a sample dict; raises ``ValueError`` on missing / empty members."""
        key = raw["__key__"]
        img_ext = next((e for e in self.image_exts if e in raw), None)
        if img_ext is None:
            raise ValueError(f"no image member ({'/'.join(self.image_exts)})")
        out: dict[str, Any] = {"sample_id": make_sample_id(shard_index, key, raw["__pos__"]), "key": key}
        if self.raw_images:
            out["image_bytes"] = raw[img_ext]
        else:
            with Image.open(io.BytesIO(raw[img_ext])) as im:
                im = im.convert("RGB")
            out["image"] = self.transform(im)
        if self.task == "classification":
            if "cls" not in raw:
                raise ValueError("no .cls member")
            out["label"] = int(raw["cls"].decode("utf-8").strip())
        else:
            if "txt" not in raw:
                raise ValueError("no .txt member")
            caps = [c.strip() for c in raw["txt"].decode("utf-8").splitlines() if c.strip()]
            if not caps:
                raise ValueError("empty .txt")
            out["captions"] = caps
        return out

    # ------------------------------------------------------------------ iteration
    def iter_shard(
        self, shard_index: int, part: ShardPart | None = None, wanted: Iterable[str] | None = None
    ) -> Iterator[dict]:
        """Yield the decoded samples of one shard kept by ``part`` / ``wanted``, counting skips and read errors."""
        url = self.urls[shard_index]
        remaining = set(wanted) if wanted is not None else None
        errors: list[BaseException] = []
        read = 0
        try:
            stream = open_stream(url)
        except Exception as e:
            errors.append(e)
            stream = None
        try:
            for raw in iter_tar_samples(stream, on_error=errors.append) if stream is not None else ():
                if part is not None and not part.keeps(raw["__pos__"]):
                    continue
                key = raw["__key__"]
                if remaining is not None:
                    if key not in remaining:
                        continue
                    remaining.discard(key)
                if (shard_index, key) in self.exclude:
                    continue
                read += 1
                try:
                    yield self.decode(raw, shard_index)
                except Exception as e:
                    self.counter.add_skipped()
                    self._warn(f"skipped sample {key!r} of shard {url!r}: {e!r}")
                if remaining is not None and not remaining:
                    break
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception as e:
                    log.debug("closing %r failed: %r", url, e)
        if errors:  # the rest of the shard is lost: how many samples is known only for a drawn subset
            self._shard_error(shard_index, errors[0], read, None if remaining is None else len(remaining))
        elif remaining:
            self.counter.add_skipped(len(remaining))
            self._warn(f"{len(remaining)} selected sample(s) not found in shard {url!r}")

    def _shard_error(self, shard_index: int, error: BaseException, read: int, lost: int | None) -> None:
        """Record a failed shard read; raise :class:`ShardReadError` unless ``tolerate_shard_errors``."""
        self.counter.add_shard_error(shard=shard_index, samples_read=read, samples_lost=lost)
        url = self.urls[shard_index]
        lost_text = "the rest of the shard" if lost is None else f"{lost} selected sample(s)"
        what = f"shard {url!r} could not be read to its end ({error!r}): {read} sample(s) read, {lost_text} lost"
        if not self.tolerate_shard_errors:
            raise ShardReadError(
                f"{what}. Re-create or re-download the shard, or set tolerate_shard_errors=True (config: "
                "data.tolerate_shard_errors: true, or per dataset data.datasets.<name>.tolerate_shard_errors) "
                "to evaluate without those samples; tolerated errors are recorded in metrics.json (shard_errors)"
            ) from error
        self._warn(f"{what} (tolerated)")

    def shard_error_report(self) -> dict[str, Any]:
        """The failed shard reads recorded in ``counter``, by shard URL (see :func:`shard_error_report`)."""
        return shard_error_report(self.counter.shard_error_records(), self.urls)

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, nw = self._consumer()
        for part, wanted in self.plan(rank, world, worker, nw):
            yield from self.iter_shard(part.shard, part, wanted)


def shard_error_report(records: Iterable[tuple[int, int, int | None]], urls: list[str]) -> dict[str, Any]:
    """``{"shards", "samples_lost", "by_shard": {url: {"errors", "samples_read", "samples_lost"}}}`` of failed reads.

    ``records`` are :meth:`SkipCounter.shard_error_records` (of one or several processes). A shard read
    by several consumers (each keeping part of its samples) sums their counts. ``samples_lost`` is
    None (unknown) where a whole shard was being read: its length is written nowhere.
    """
    by_shard: dict[str, dict[str, Any]] = {}
    for shard, read, lost in sorted(records, key=lambda r: r[0]):
        row = by_shard.setdefault(urls[shard], {"errors": 0, "samples_read": 0, "samples_lost": 0})
        row["errors"] += 1
        row["samples_read"] += read
        row["samples_lost"] = None if lost is None or row["samples_lost"] is None else row["samples_lost"] + lost
    losses = [r["samples_lost"] for r in by_shard.values()]
    total = None if None in losses else sum(losses)
    return {"shards": len(by_shard), "samples_lost": total, "by_shard": by_shard}


class EncodedImages:
    """A batch's encoded images (``bytes``, in batch order) held as one object, not as a list.

    Lightning's ``apply_to_collection`` (device transfer, precision conversion) recurses into every
    ``Sequence``, and ``bytes`` is one: a plain list of JPEGs is rebuilt int by int, slow enough to
    time a GPU-decoding validate out (BENCHMARKS.md §4). This class is no
    ``Sequence`` and has no ``to``, so the walk returns it untouched; it still has ``len``,
    iteration and indexing.
    """

    __slots__ = ("data",)

    def __init__(self, data: Iterable[bytes]) -> None:
        self.data = list(data)

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.data)

    def __getitem__(self, index: int) -> bytes:
        return self.data[index]

    def __repr__(self) -> str:
        return f"EncodedImages({len(self.data)} images, {sum(len(d) for d in self.data)} bytes)"


def collate(samples: list[dict]) -> dict:
    """Batch dict: image (B,3,H,W), label (B,) long | captions list[list[str]], sample_id (B,), key."""
    batch: dict[str, Any] = {
        "sample_id": torch.tensor([s["sample_id"] for s in samples], dtype=torch.long),
        "key": [s["key"] for s in samples],
    }
    if samples and "image_bytes" in samples[0]:  # encoded: decoded as a batch later
        batch["image_bytes"] = EncodedImages(s["image_bytes"] for s in samples)
    else:
        batch["image"] = torch.stack([s["image"] for s in samples])
    if samples and "label" in samples[0]:
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    if samples and "captions" in samples[0]:
        batch["captions"] = [list(s["captions"]) for s in samples]
    return batch


def uncollate(batch: dict) -> list[dict]:
    """The samples of a :func:`collate` batch (inverse of it; images stay views of the batch tensor)."""
    n = len(batch["key"])
    per_sample = {"sample_id": batch["sample_id"].tolist(), "key": batch["key"]}
    for name in ("image", "image_bytes", "captions"):
        if name in batch:
            per_sample[name] = batch[name]
    if "label" in batch:
        per_sample["label"] = batch["label"].tolist()
    return [{name: values[i] for name, values in per_sample.items()} for i in range(n)]


class CanonicalBatches:
    """A drawn subset's batches, full and in ``sample_id`` order, whatever the DataLoader's worker count.

    Each worker of a DataLoader over a :class:`ShardDataset` batches its own share of the shards, so
    32 calibration images at batch size 128 over 6 workers arrive as six batches of 5-6, in an order
    that depends on the worker count. Calibration then runs six small forwards (the register search's
    per-configuration re-calibration then cost far more than with one batch, BENCHMARKS.md §1) and any
    method that depends on batch boundaries or order would change with ``num_workers``. This
    collects the (small) subset, sorts it by ``sample_id`` (stable across runs, ranks and workers)
    and re-batches it to ``batch_size``. A whole split (``ordered=False``: unbounded, not collected)
    is only re-batched to full batches, in arrival order.
    """

    def __init__(self, loader: Iterable[dict], batch_size: int, ordered: bool = True) -> None:
        self.loader, self.batch_size, self.ordered = loader, batch_size, ordered

    def __iter__(self) -> Iterator[dict]:
        if self.ordered:
            samples = sorted((s for b in self.loader for s in uncollate(b)), key=lambda s: s["sample_id"])
            for i in range(0, len(samples), self.batch_size):
                yield collate(samples[i : i + self.batch_size])
            return
        pending: list[dict] = []
        for batch in self.loader:
            pending += uncollate(batch)
            while len(pending) >= self.batch_size:
                yield collate(pending[: self.batch_size])
                pending = pending[self.batch_size :]
        if pending:
            yield collate(pending)
