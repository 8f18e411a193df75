"""Fake-quantization engine: quantizers, quantizable layers, methods as config + transform."""

from regcache.quant import methods  # noqa: F401  (registers the methods)
from regcache.quant.api import (
    METHODS,
    CoverageManifest,
    MethodConfigError,
    QuantConfig,
    block_linears,
    block_linears_and_matmuls,
    calibrate_,
    config_from_dict,
    coverage,
    describe_methods,
    is_calibrated,
    method_config,
    quantize_,
)
from regcache.quant.methods import NaiveConfig
from regcache.quant.modules import MatMul, QuantConv2d, QuantLinear, quant_mode, quantizers, set_quant_mode
from regcache.quant.quantizers import QUANTIZERS, Quantizer, UniformQuantizer, round_ste
from regcache.quant.state import load_quant_state, save_quant_state

__all__ = [
    "METHODS",
    "QUANTIZERS",
    "CoverageManifest",
    "MatMul",
    "MethodConfigError",
    "NaiveConfig",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "Quantizer",
    "UniformQuantizer",
    "block_linears",
    "block_linears_and_matmuls",
    "calibrate_",
    "config_from_dict",
    "coverage",
    "describe_methods",
    "is_calibrated",
    "load_quant_state",
    "method_config",
    "quant_mode",
    "quantize_",
    "quantizers",
    "round_ste",
    "save_quant_state",
    "set_quant_mode",
]
