"""Save a calibrated model's quantization state to one safetensors file and load it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import load_file, save_file

from regcache.quant.api import config_from_dict, coverage, is_calibrated, quantize_
from regcache.quant.modules import quantizers, set_quant_mode
from regcache.utils import weights_fingerprint

if TYPE_CHECKING:
    from regcache.encoders.base import VisionEncoder


def _state_tensors(encoder: VisionEncoder) -> dict:
    names = {n for n, _ in quantizers(encoder)}
    config = encoder.quant_config
    out = {}
    for key, t in encoder.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in names or (config.modifies_weights and key.startswith("blocks.")):
            out[key] = t.detach().contiguous().cpu()
    return out


def save_quant_state(encoder: VisionEncoder, path: str | Path) -> Path:
    """Write quantizer parameters (and weights the method edited) plus metadata to ``path``."""
    if not is_calibrated(encoder):
        raise RuntimeError("nothing to save: the encoder is not calibrated")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "config": json.dumps(encoder.quant_config.to_dict()),
        "float_fingerprint": encoder.float_fingerprint,
        "manifest": json.dumps(coverage(encoder).tensors),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(_state_tensors(encoder), str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def load_quant_state(encoder: VisionEncoder, path: str | Path) -> VisionEncoder:
    """Attach the saved method to a fresh adapted ``encoder`` and restore its calibration.

    Refuses (``ValueError``) if the encoder's float weights differ from those it was calibrated on.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no quantization state at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    fp = weights_fingerprint(encoder)
    if meta["float_fingerprint"] != fp:
        raise ValueError(
            f"{path} was calibrated on a model with weights fingerprint {meta['float_fingerprint']}, "
            f"this encoder has {fp}: load it onto the same model (and checkpoint) it was made for"
        )
    quantize_(encoder, config_from_dict(json.loads(meta["config"])))
    tensors = load_file(str(path), device=str(next(encoder.parameters()).device))
    result = encoder.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path} holds tensors this encoder lacks: {result.unexpected_keys[:5]}")
    uncalibrated = [n for n, q in quantizers(encoder) if not q.is_calibrated]
    if uncalibrated:
        raise ValueError(f"{path} lacks parameters for quantizers {uncalibrated[:5]}")
    set_quant_mode(encoder, "quant")
    return encoder


__all__ = ["load_quant_state", "save_quant_state"]
