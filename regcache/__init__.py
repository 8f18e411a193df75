"""regcache: post-training quantization of vision encoders with prefixing registers (RegCache).

Plain-PyTorch core (no Lightning needed)::

    import regcache as rc
    loaded = rc.load_model("ViT-B-16", "laion2b_s34b_b88k")
    encoder = rc.adapt(loaded.model)               # canonical blocks; model.encode_image still works
    rc.quantize_(encoder, rc.NaiveConfig(w_bits=8, a_bits=8))
    rc.calibrate_(encoder, calibration_batches)
    features = encoder(images)
"""

from regcache import _clock  # noqa: F401  (first: metrics.json's timings_s["startup"] counts from its import)
from regcache.encoders import AttentionPrefix, VisionEncoder, adapt, record
from regcache.loading import LoadedModel, WeightsUnavailableError, load_model
from regcache.models import register_model_configs
from regcache.quant import (
    METHODS,
    NaiveConfig,
    QuantConfig,
    calibrate_,
    coverage,
    load_quant_state,
    quant_mode,
    quantize_,
    save_quant_state,
    set_quant_mode,
)

register_model_configs()

__version__ = "0.1.0"
__all__ = [
    "METHODS",
    "AttentionPrefix",
    "LoadedModel",
    "NaiveConfig",
    "QuantConfig",
    "VisionEncoder",
    "WeightsUnavailableError",
    "adapt",
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
