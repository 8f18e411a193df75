"""Batched JPEG decoding + preprocessing on the GPU (``torchvision.io.decode_jpeg(..., device="cuda")``).

The dataloader workers then only read the shards and pass the encoded bytes on (``ShardDataset(...,
raw_images=True)``, batch key ``image_bytes``); :class:`TensorPreprocess` decodes a whole batch with
nvJPEG and applies resize (shorter side, bicubic, antialiased) → center crop → [0, 1] → normalize
on the device. The same code runs on the CPU (``device="cpu"``), which is how it is tested.

The result matches the PIL pipeline of :func:`open_clip.image_transform` up to resampling
differences (tensor vs PIL bicubic kernels, no uint8 rounding after the resize): not bit-identical.
Images that are not JPEG (PNG, WebP) are decoded on the CPU with ``decode_image`` and moved.

:class:`DecodePrefetcher` runs that decode + preprocessing for the next batches in a background
thread on its own CUDA stream, so it overlaps the model's work on the current batch; the batch
carries a :class:`PendingImages` that the consumer waits for on its own stream (no host sync).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["DecodePrefetcher", "PendingImages", "TensorPreprocess"]

_JPEG_MAGIC = b"\xff\xd8"


def _as_tensor(data: bytes | torch.Tensor) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


@dataclass
class TensorPreprocess:
    """Decode encoded images and preprocess them as a batch: (B, 3, crop, crop) float32 on ``device``.

    Args:
        size: the shorter side after the resize (an int), or the exact (H, W).
        crop: center crop (H, W) (an int for a square).
        mean, std: per-channel normalization of the [0, 1] image.
        interpolation: ``bicubic`` / ``bilinear`` (antialiased).
    """

    size: int | tuple[int, int] = 224
    crop: int | tuple[int, int] = 224
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    interpolation: str = "bicubic"
    _constants: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_transform(cls, transform: Callable) -> TensorPreprocess:
        """Read size / crop / normalization off a torchvision ``Compose`` (e.g. open_clip's eval preprocessing).

        Raises ValueError for a transform it does not understand (anything but Resize, CenterCrop,
        Normalize and the RGB / to-tensor conversions).
        """
        from torchvision import transforms as T

        steps = getattr(transform, "transforms", None)
        if steps is None:
            raise ValueError(f"cannot derive a tensor preprocessing from {transform!r} (not a Compose)")
        out = cls(size=0, crop=0)
        for step in steps:
            name = type(step).__name__
            if isinstance(step, T.Resize):
                size = step.size
                out.size = size[0] if isinstance(size, Sequence) and len(size) == 1 else size
                if isinstance(out.size, list):
                    out.size = tuple(out.size)
                out.interpolation = step.interpolation.value
            elif isinstance(step, T.CenterCrop):
                out.crop = tuple(step.size)
            elif isinstance(step, T.Normalize):
                out.mean, out.std = tuple(step.mean), tuple(step.std)
            elif name in ("ToTensor", "MaybeToTensor", "MaybeConvertMode", "ConvertImageDtype", "function"):
                continue
            else:
                raise ValueError(f"cannot run {name} on decoded tensors (supported: Resize, CenterCrop, Normalize)")
        if not out.size or not out.crop:
            raise ValueError(f"{transform!r} has no Resize or no CenterCrop")
        if out.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"unsupported interpolation {out.interpolation!r}")
        return out

    def decode(self, images: Iterable[bytes | torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
        """uint8 (3, H, W) tensors on ``device``: JPEGs batched through ``decode_jpeg``, the rest on the CPU."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        data = [_as_tensor(x) for x in images]
        is_jpeg = [bytes(d[:2].tolist()) == _JPEG_MAGIC for d in data]
        out: list[torch.Tensor | None] = [None] * len(data)
        jpeg_idx = [i for i, j in enumerate(is_jpeg) if j]
        if jpeg_idx:
            decoded = decode_jpeg([data[i] for i in jpeg_idx], mode=ImageReadMode.RGB, device=device)
            for i, img in zip(jpeg_idx, decoded, strict=True):
                out[i] = img
        for i, j in enumerate(is_jpeg):
            if not j:
                out[i] = decode_image(data[i], mode=ImageReadMode.RGB).to(device)
        return out  # type: ignore[return-value]

    def resize_crop(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (..., 3, H, W) images of one size → float32 (..., 3, crop_h, crop_w) in [0, 255]."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        x = TF.resize(image.float(), self.size, interpolation=mode, antialias=True)
        return TF.center_crop(x, list(self.crop) if isinstance(self.crop, tuple) else [self.crop, self.crop])

    def resize_crop_batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 (3, H_i, W_i) images → float32 (B, 3, crop_h, crop_w): one :meth:`resize_crop` per distinct size.

        Each resize works on every image of the batch with that decoded size at once (the kernel
        computes each image independently, so this equals the per-image result bit for bit);
        one image per size costs what it did per image.
        """
        groups: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault((tuple(img.shape), img.dtype, img.device), []).append(i)
        if len(groups) == 1:
            batch = images[0].unsqueeze(0) if len(images) == 1 else torch.stack(list(images))
            return self.resize_crop(batch).contiguous()
        out: list[torch.Tensor | None] = [None] * len(images)
        for idx in groups.values():
            group = images[idx[0]].unsqueeze(0) if len(idx) == 1 else torch.stack([images[i] for i in idx])
            for i, y in zip(idx, self.resize_crop(group), strict=True):
                out[i] = y
        return torch.stack(out)  # type: ignore[arg-type]

    def normalization(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean·255, std·255) as (1, C, 1, 1) float32 on ``device``, copied there once.

        A fresh ``torch.tensor(..., device="cuda")`` per batch is a blocking copy that waits for
        everything queued on the stream (the previous batch's model included).
        """
        device = torch.device(device)
        if device not in self._constants:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
            self._constants[device] = (mean.to(device), std.to(device))
        return self._constants[device]

    def __call__(
        self, images: Iterable[bytes | torch.Tensor], device: torch.device | str = "cuda", per_image: bool = False
    ) -> torch.Tensor:
        """(B, 3, crop_h, crop_w) float32 normalized images on ``device``.

        ``per_image=True`` resizes image by image (the reference :meth:`resize_crop_batch` equals).
        """
        decoded = self.decode(images, device)
        if not decoded:
            raise ValueError("no images to decode")
        if per_image:
            batch = torch.stack([self.resize_crop(img) for img in decoded])
        else:
            batch = self.resize_crop_batch(decoded)
        mean, std = self.normalization(batch.device)
        if batch.is_cuda:  # cached constants are read from whichever stream runs this
            stream = torch.cuda.current_stream(batch.device)
            mean.record_stream(stream)
            std.record_stream(stream)
        return batch.clamp_(0.0, 255.0).sub_(mean).div_(std)


class PendingImages:
    """Preprocessed images being produced on a side CUDA stream; :meth:`wait` hands them to the current stream.

    Deliberately no ``Sequence`` and no ``to`` method: Lightning's batch transfer / precision
    conversion leave it untouched, so nothing reads the images before the step asks for them.
    """

    __slots__ = ("_event", "_images")

    def __init__(self, images: torch.Tensor, event: torch.cuda.Event | None = None) -> None:
        self._images = images
        self._event = event

    def wait(self) -> torch.Tensor:
        """The images, safe to use on the current stream: a GPU-side wait on their producer, no host sync."""
        if self._event is not None:
            stream = torch.cuda.current_stream(self._images.device)
            stream.wait_event(self._event)
            # allocated on the producer's stream: without this the allocator could reuse the memory
            # for that stream's next batch while this stream still reads it
            self._images.record_stream(stream)
            self._event = None
        return self._images

    def __repr__(self) -> str:
        return f"PendingImages({tuple(self._images.shape)}, {self._images.device})"


class DecodePrefetcher:
    """Iterate a loader of encoded-image batches, decoding up to ``depth`` batches ahead in a background thread.

    Each batch's ``image_bytes`` is replaced by ``image_pending`` (:class:`PendingImages`); call
    ``batch["image_pending"].wait()`` (or the datamodule's ``decode_batch``) where the images are
    used. On CUDA the thread works on its own stream and records an event per batch; the consumer
    waits on it when it uses the batch, not when it fetches it (Lightning fetches one batch ahead,
    and a wait placed then would hold the current step back until the next batch is decoded).
    Works on the CPU too (no streams; the images are ready when yielded).

    Args:
        loader: yields batch dicts with ``image_bytes`` (others pass through unchanged).
        preprocess: decode + preprocessing (:class:`TensorPreprocess`).
        device: where to decode.
        depth: decoded batches that may wait for the consumer.
    """

    def __init__(
        self, loader: Iterable[dict], preprocess: TensorPreprocess, device: torch.device | str, depth: int = 2
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.loader = loader
        self.preprocess = preprocess
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # the caller's current device: the decode thread's own default would be cuda:0
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.depth = depth

    def __len__(self) -> int:
        return len(self.loader)  # a TypeError for loaders without a length, which Lightning expects

    def __iter__(self) -> Iterator[dict]:
        # the loader's iterator (its worker processes) starts on the caller's thread, as it would unwrapped
        return _PrefetchIterator(iter(self.loader), self.preprocess, self.device, self.depth)


_END = object()


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _PrefetchIterator:
    def __init__(self, batches: Iterator[dict], preprocess: TensorPreprocess, device: torch.device, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._thread = threading.Thread(
            target=_produce,
            args=(batches, preprocess, device, stream, self._queue, self._stop),
            name="regcache-decode-prefetch",
            daemon=True,
        )
        self._thread.start()

    def __iter__(self) -> _PrefetchIterator:
        return self

    def __next__(self) -> dict:
        if self._done:
            raise StopIteration
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    self._done = True
                    raise RuntimeError("the decode thread ended without a result") from None
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        return item

    def close(self) -> None:
        """Stop the thread (it drops the loader's iterator, which ends its workers) and free queued batches."""
        self._done = True
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()

    def __del__(self) -> None:
        self.close()


def _put(out: queue.Queue, item: object, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            out.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _produce(
    batches: Iterator[dict],
    preprocess: TensorPreprocess,
    device: torch.device,
    stream: torch.cuda.Stream | None,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    try:
        with contextlib.ExitStack() as context:
            if stream is not None:  # the current device and stream are per thread
                context.enter_context(torch.cuda.device(device))
                context.enter_context(torch.cuda.stream(stream))
            for batch in batches:
                if stop.is_set():
                    return
                encoded = batch.pop("image_bytes", None) if isinstance(batch, dict) else None
                if encoded is not None:
                    images = preprocess(encoded, device)
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                    batch["image_pending"] = PendingImages(images, event)
                if not _put(out, batch, stop):
                    return
        _put(out, _END, stop)
    except BaseException as e:  # handed to the consumer, raised there
        _put(out, _Failure(e), stop)
