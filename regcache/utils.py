"""Small shared helpers: model fingerprints, seeding, JSON writing."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn


def weights_fingerprint(module: nn.Module, max_elements: int = 1 << 16, skip_prefixes: tuple[str, ...] = ()) -> str:
    """A short hash of a module's parameter names, shapes and (strided samples of) values.

    Identical weights give identical fingerprints on any device; it distinguishes checkpoints
    without hashing every byte of a large model. State entries whose names start with one of
    ``skip_prefixes`` are left out (e.g. ``("visual.",)``: a CLIP model's text side only).
    """
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        if name.startswith(skip_prefixes) or not torch.is_floating_point(p) or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // max_elements)
        sample = flat[::step].to(device="cpu", dtype=torch.float32).contiguous()
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def seed_everything(seed: int) -> None:
    """Seed python, torch (CPU and CUDA) for reproducible sampling."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    torch.manual_seed(seed)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (temp file + rename), so an interrupted run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
