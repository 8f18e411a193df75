"""The embedded outlier testbed: a small CLIP (open_clip) with a planted massive-activation mechanism.

    from regcache.testbed import load_testbed
    loaded = load_testbed()                  # committed weights, canvas preprocessing, tokenizer
    spec = loaded_spec()                     # where the mechanism sits: spec.l_q, spec.sink_blocks, ...

It is *constructed* (docs: testbed.md): real CLIP numbers never come from it. Sample data in
CLIP_benchmark layout ships beside it (:data:`CIFAR10_SAMPLE`, :data:`IMAGENET_SAMPLE`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

import regcache.models  # noqa: F401  (registers the testbed's open_clip config)
from regcache.testbed.data import (
    ASSETS_DIR,
    CIFAR10_SAMPLE,
    IMAGENET_SAMPLE,
    CanvasTransform,
    load_split,
    read_lines,
)
from regcache.testbed.model import Frozen, TestbedSpec, plant_

if TYPE_CHECKING:
    from regcache.loading import LoadedModel

TESTBED_NAME = "regcache-testbed"
WEIGHTS_PATH = ASSETS_DIR / "testbed.safetensors"


def create_testbed(spec: TestbedSpec | None = None) -> tuple[nn.Module, Frozen]:
    """A freshly initialized testbed CLIP with the mechanism planted, and its frozen (planted) entries."""
    import open_clip

    from regcache.models import register_model_configs

    register_model_configs()
    spec = spec or TestbedSpec()
    torch.manual_seed(spec.seed)
    model = open_clip.create_model(TESTBED_NAME)
    return model, plant_(model, spec)


def save_testbed(
    model: nn.Module, spec: TestbedSpec, path: str | Path, dtype: torch.dtype = torch.float16, info: dict | None = None
) -> Path:
    """Write the full open_clip state dict (loadable by ``open_clip.create_model(..., pretrained=path)``) + spec."""
    from safetensors.torch import save_file

    state = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    metadata = {"model_name": TESTBED_NAME, "spec": spec.to_json(), "info": json.dumps(info or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


def loaded_spec(path: str | Path | None = None) -> TestbedSpec:
    """The :class:`TestbedSpec` stored with the weights (default: the committed ones)."""
    from safetensors import safe_open

    with safe_open(str(path or WEIGHTS_PATH), "pt") as f:
        return TestbedSpec.from_json(f.metadata()["spec"])


def testbed_info(path: str | Path | None = None) -> dict:
    """Training provenance and acceptance numbers stored with the weights."""
    from safetensors import safe_open

    with safe_open(str(path or WEIGHTS_PATH), "pt") as f:
        return json.loads(f.metadata().get("info", "{}"))


def load_testbed(pretrained: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """The testbed as a :class:`~regcache.loading.LoadedModel` (default: the committed weights, fp32)."""
    import open_clip

    from regcache.loading import LoadedModel, _is_mismatch, _mismatch
    from regcache.models import register_model_configs

    register_model_configs()
    path = Path(pretrained or WEIGHTS_PATH)
    if not path.is_file():
        raise FileNotFoundError(f"testbed weights {path} not found (train them: python -m regcache.testbed.train)")
    try:
        model = open_clip.create_model(TESTBED_NAME, pretrained=str(path), device=str(device)).eval()
    except Exception as exc:
        if not _is_mismatch(exc):
            raise
        fix = "pass weights saved from the testbed (regcache.testbed.save_testbed), or leave pretrained unset"
        raise _mismatch(str(path), TESTBED_NAME, exc, fix) from exc
    spec = loaded_spec(path)
    preprocess = CanvasTransform(spec.canvas_size, spec.content_size)
    return LoadedModel(model, preprocess, open_clip.get_tokenizer(TESTBED_NAME), TESTBED_NAME, str(path), str(path))


__all__ = [
    "CIFAR10_SAMPLE",
    "IMAGENET_SAMPLE",
    "TESTBED_NAME",
    "WEIGHTS_PATH",
    "CanvasTransform",
    "TestbedSpec",
    "create_testbed",
    "load_split",
    "load_testbed",
    "loaded_spec",
    "read_lines",
    "save_testbed",
    "testbed_info",
]
