"""The testbed's input format (image on a mean-colour canvas) and its small CLIP_benchmark-style samples.

Every image is resized (shorter side) and centre-cropped to ``content_size`` and pasted on a
``canvas_size`` square canvas of the normalization mean colour (0 after normalization), as
pad-to-square preprocessing does. At evaluation the image sits in the centre; training places
it at random. The canvas patches carry no information, which is what the planted cue detects.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.transforms import functional as TF

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DATA_DIR = ASSETS_DIR / "data"
CIFAR10_SAMPLE = DATA_DIR / "cifar10_sample"  # test: evaluation sample; train: calibration / reference sample
IMAGENET_SAMPLE = DATA_DIR / "imagenet1k_sample_small"  # one image per class, shorter side 48
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".webp", ".jpg", ".jpeg", ".png")


class CanvasTransform:
    """PIL image → normalized (3, canvas, canvas) tensor with the image centred on a mean-colour canvas."""

    def __init__(
        self,
        canvas_size: int = 48,
        content_size: int = 32,
        mean: tuple[float, ...] = OPENAI_MEAN,
        std: tuple[float, ...] = OPENAI_STD,
    ) -> None:
        self.canvas_size = canvas_size
        self.content_size = content_size
        self.mean = mean
        self.std = std

    def content(self, image: Image.Image) -> torch.Tensor:
        """The normalized content square (3, content, content), before it is put on the canvas."""
        image = image.convert("RGB")
        if image.size != (self.content_size, self.content_size):
            image = TF.center_crop(
                TF.resize(image, self.content_size, interpolation=TF.InterpolationMode.BICUBIC), self.content_size
            )
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        before = (self.canvas_size - self.content_size) // 2
        after = self.canvas_size - self.content_size - before
        return F.pad(self.content(image), (before, after, before, after), value=0.0)

    def __repr__(self) -> str:
        return f"CanvasTransform(canvas_size={self.canvas_size}, content_size={self.content_size})"


def place_on_canvas(content: torch.Tensor, canvas_size: int, offsets: torch.Tensor) -> torch.Tensor:
    """Batched: put normalized (B, 3, s, s) images on zero canvases at per-image (row, col) offsets (B, 2)."""
    b, ch, s, _ = content.shape
    canvas = content.new_zeros(b, canvas_size, canvas_size, ch)
    r = offsets[:, 0, None] + torch.arange(s, device=content.device)  # (B, s)
    c = offsets[:, 1, None] + torch.arange(s, device=content.device)
    canvas[torch.arange(b, device=content.device)[:, None, None], r[:, :, None], c[:, None, :]] = content.permute(
        0, 2, 3, 1
    )
    return canvas.permute(0, 3, 1, 2).contiguous()


def iter_shard_samples(root: str | Path, split: str) -> Iterator[tuple[str, bytes, int]]:
    """(key, image bytes, label) of every sample of ``root/split/{0..n-1}.tar`` in order."""
    split_dir = Path(root) / split
    nshards = int((split_dir / "nshards.txt").read_text().strip())
    for i in range(nshards):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(split_dir / f"{i}.tar") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.rpartition(".")
                members.setdefault(key, {})["." + ext] = tar.extractfile(m).read()
        for key, files in members.items():
            image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
            if image is not None and ".cls" in files:
                yield key, image, int(files[".cls"].decode().strip())


def load_split(
    root: str | Path,
    split: str,
    transform: Callable[[Image.Image], torch.Tensor] | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of a split through ``transform`` (default: the evaluation canvas), labels and keys."""
    transform = transform or CanvasTransform()
    images, labels, keys = [], [], []
    for key, data, label in iter_shard_samples(root, split):
        images.append(transform(Image.open(io.BytesIO(data))))
        labels.append(label)
        keys.append(key)
        if limit is not None and len(keys) >= limit:
            break
    return torch.stack(images), torch.tensor(labels), keys


def read_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a text file (class names, templates)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def write_shard(path: str | Path, samples: list[tuple[str, bytes, int]]) -> None:
    """Write (key, jpeg bytes, label) samples as one CLIP_benchmark webdataset tar (``.jpg`` + ``.cls``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, data, label in samples:
            for ext, payload in ((".jpg", data), (".cls", str(label).encode())):
                info = tarfile.TarInfo(key + ext)
                info.size = len(payload)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(payload))


__all__ = [
    "CIFAR10_SAMPLE",
    "DATA_DIR",
    "IMAGENET_SAMPLE",
    "CanvasTransform",
    "iter_shard_samples",
    "load_split",
    "place_on_canvas",
    "read_lines",
    "write_shard",
]
