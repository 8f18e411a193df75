"""regcache: post-training quantization of vision encoders with prefixing registers (RegCache).

Plain-PyTorch core (no Lightning needed)::

    import regcache as rc
    loaded = rc.load_model("ViT-B-16", "laion2b_s34b_b88k")
    encoder = rc.adapt(loaded.model)               # canonical blocks; model.encode_image still works
    rc.quantize_(encoder, rc.NaiveConfig(w_bits=8, a_bits=8))
    rc.calibrate_(encoder, calibration_batches)
    features = encoder(images)
"""

import importlib
from typing import Any

from regcache import _clock  # noqa: F401  (first: metrics.json's timings_s["startup"] counts from its import)

# Attributes import their module on first use, so `regcache --help` (and any command's own help)
# answers without importing torch, open_clip or Lightning.
_LAZY = {
    "AttentionPrefix": "regcache.encoders",
    "VisionEncoder": "regcache.encoders",
    "adapt": "regcache.encoders",
    "record": "regcache.encoders",
    "CheckpointMismatchError": "regcache.loading",
    "LoadedModel": "regcache.loading",
    "WeightsUnavailableError": "regcache.loading",
    "load_model": "regcache.loading",
    "register_model_configs": "regcache.models",
    "RegCacheConfig": "regcache.registers",
    "apply_regcache": "regcache.registers",
    **dict.fromkeys(
        [
            "METHODS",
            "NaiveConfig",
            "QuantConfig",
            "calibrate_",
            "coverage",
            "load_quant_state",
            "quant_mode",
            "quantize_",
            "save_quant_state",
            "set_quant_mode",
        ],
        "regcache.quant",
    ),
}


def __getattr__(name: str) -> Any:
    """Import a public attribute's module on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'regcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Public names, the lazy ones included."""
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"
__all__ = [
    "METHODS",
    "AttentionPrefix",
    "CheckpointMismatchError",
    "LoadedModel",
    "NaiveConfig",
    "QuantConfig",
    "RegCacheConfig",
    "VisionEncoder",
    "WeightsUnavailableError",
    "adapt",
    "apply_regcache",
    "calibrate_",
    "coverage",
    "load_model",
    "load_quant_state",
    "quant_mode",
    "quantize_",
    "record",
    "save_quant_state",
    "set_quant_mode",
]
