"""Batched JPEG decoding + preprocessing on the GPU (``torchvision.io.decode_jpeg(..., device="cuda")``).

The dataloader workers then only read the shards and pass the encoded bytes on (``ShardDataset(...,
raw_images=True)``, batch key ``image_bytes``); :class:`TensorPreprocess` decodes a whole batch with
nvJPEG and applies resize (shorter side, bicubic, antialiased) → center crop → [0, 1] → normalize
on the device. The same code runs on the CPU (``device="cpu"``), which is how it is tested.

The result matches the PIL pipeline of :func:`open_clip.image_transform` up to resampling
differences (tensor vs PIL bicubic kernels, no uint8 rounding after the resize): not bit-identical.
Images that are not JPEG (PNG, WebP) are decoded on the CPU with ``decode_image`` and moved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["TensorPreprocess"]

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

    def decode(self, images: Sequence[bytes | torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
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
        """One uint8 (3, H, W) image → float32 (3, crop_h, crop_w) in [0, 255]."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        x = TF.resize(image.float(), self.size, interpolation=mode, antialias=True)
        return TF.center_crop(x, list(self.crop) if isinstance(self.crop, tuple) else [self.crop, self.crop])

    def __call__(self, images: Sequence[bytes | torch.Tensor], device: torch.device | str = "cuda") -> torch.Tensor:
        """(B, 3, crop_h, crop_w) float32 normalized images on ``device``."""
        if not len(images):
            raise ValueError("no images to decode")
        batch = torch.stack([self.resize_crop(img) for img in self.decode(images, device)])
        mean = torch.tensor(self.mean, device=batch.device).view(1, -1, 1, 1) * 255.0
        std = torch.tensor(self.std, device=batch.device).view(1, -1, 1, 1) * 255.0
        return batch.clamp_(0.0, 255.0).sub_(mean).div_(std)
