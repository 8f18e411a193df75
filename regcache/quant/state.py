"""A calibrated model's quantization state as plain tensors + metadata, and as one safetensors file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from regcache.quant.api import config_from_dict, coverage, is_calibrated, quantize_
from regcache.quant.modules import quantizers, set_quant_mode
from regcache.utils import weights_fingerprint

if TYPE_CHECKING:
    from regcache.encoders.base import VisionEncoder

QuantState = tuple[dict[str, torch.Tensor], dict[str, str]]


def quant_state(encoder: VisionEncoder) -> QuantState:
    """Quantizer parameters (and the block weights, for methods that edit them) plus metadata, on CPU."""
    if not is_calibrated(encoder):
        raise RuntimeError("no calibrated quantization state: quantize_ and calibrate_ the encoder first")
    config = encoder.quant_config
    owners = {n for n, _ in quantizers(encoder)}
    tensors = {
        key: t.detach().contiguous().cpu()
        for key, t in encoder.state_dict().items()
        if key.rpartition(".")[0] in owners or (config.modifies_weights and key.startswith("blocks."))
    }
    meta = {
        "config": json.dumps(config.to_dict()),
        "float_fingerprint": encoder.float_fingerprint,
        "manifest": json.dumps(coverage(encoder).tensors),
    }
    summary = getattr(encoder, "calibration_summary", None)  # what a method reports of its calibration
    if summary is not None:
        meta["calibration_summary"] = json.dumps(summary)
    return tensors, meta


def apply_quant_state(encoder: VisionEncoder, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> VisionEncoder:
    """Restore a state onto ``encoder``: a fresh adapted one, or one with the same method attached but
    not calibrated. Refuses (``ValueError``) another model's state or another method's."""
    config = config_from_dict(json.loads(meta["config"]))
    attached = getattr(encoder, "quant_config", None)
    fingerprint = encoder.float_fingerprint if attached is not None else weights_fingerprint(encoder)
    if meta["float_fingerprint"] != fingerprint:
        raise ValueError(
            f"the state was calibrated on a model with weights fingerprint {meta['float_fingerprint']}, "
            f"this encoder has {fingerprint}: load it onto the same model (and checkpoint) it was made for"
        )
    if attached is None:
        quantize_(encoder, config)
    elif not attached.adopt_state_config(encoder, config):
        raise ValueError(f"the state is for {config.to_dict()}, the encoder has {attached.to_dict()} attached")
    device = next(encoder.parameters()).device
    with torch.inference_mode(False):
        result = encoder.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"the state holds tensors this encoder lacks: {result.unexpected_keys[:5]}")
    uncalibrated = [n for n, q in quantizers(encoder) if not q.is_calibrated]
    if uncalibrated:
        raise ValueError(f"the state lacks parameters for quantizers {uncalibrated[:5]}")
    if "calibration_summary" in meta:
        encoder.calibration_summary = json.loads(meta["calibration_summary"])
    set_quant_mode(encoder, "quant")
    return encoder


def save_quant_state(encoder: VisionEncoder, path: str | Path) -> Path:
    """Write :func:`quant_state` to one safetensors file (atomically)."""
    return write_quant_state(path, quant_state(encoder))


def write_quant_state(path: str | Path, state: QuantState) -> Path:
    """Write a (tensors, metadata) state to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state[0], str(tmp), metadata=state[1])
    tmp.replace(path)
    return path


def read_quant_state(path: str | Path) -> QuantState:
    """Read a state written by :func:`save_quant_state`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no quantization state at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def load_quant_state(encoder: VisionEncoder, path: str | Path) -> VisionEncoder:
    """Restore the state saved at ``path`` onto ``encoder`` (see :func:`apply_quant_state`)."""
    return apply_quant_state(encoder, *read_quant_state(path))


__all__ = [
    "QuantState",
    "apply_quant_state",
    "load_quant_state",
    "quant_state",
    "read_quant_state",
    "save_quant_state",
    "write_quant_state",
]
