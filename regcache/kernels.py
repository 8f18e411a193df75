"""One kernel configuration: which numerics paths the process runs, settable from config and Python.

:class:`KernelConfig` gathers the switches of the fast paths: the fused quantized attention (and its
exact mode and tile), the fused fake quantization, the fused NoisyQuant search kernels and SDPA for
float attention. It is read once from the environment at import (``REGCACHE_FUSED_ATTENTION``,
``REGCACHE_FUSED_ATTENTION_EXACT``, ``REGCACHE_FUSED_ATTENTION_TILE``, ``REGCACHE_FUSED_FAKE_QUANT``,
``REGCACHE_FUSED_NOISYQUANT``, ``REGCACHE_FLOAT_SDPA``: the defaults), then set with
:func:`set_kernel_config` or, for a block, :func:`kernel_config`.

A kernel that fails to build or launch falls back to its op-by-op path for the rest of the process;
every such fallback is recorded (:func:`fallbacks`, in metrics.json's run record) with its reason,
and setting a configuration clears it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

ENV = {
    "fused_attention": "REGCACHE_FUSED_ATTENTION",
    "fused_attention_exact": "REGCACHE_FUSED_ATTENTION_EXACT",
    "fused_attention_tile": "REGCACHE_FUSED_ATTENTION_TILE",
    "fused_fake_quant": "REGCACHE_FUSED_FAKE_QUANT",
    "fused_noisyquant": "REGCACHE_FUSED_NOISYQUANT",
    "float_sdpa": "REGCACHE_FLOAT_SDPA",
}


@dataclass(frozen=True)
class KernelConfig:
    """The numerics paths of the process.

    Args:
        fused_attention: quantized attention as one Triton kernel where it applies (CUDA); false keeps
            the explicit path, the reference numerics.
        fused_attention_exact: the kernel repeats the eager path's rounding op for op (slower).
        fused_attention_tile: (query rows, keys) per tile, powers of two >= 16 (the H100's best: 64, 16).
        fused_fake_quant: one-kernel CUDA fake quantization (bit-identical to the plain formula).
        fused_noisyquant: Triton kernels for NoisyQuant's per-linear search (CUDA).
        float_sdpa: float attention (nothing quantized or hooked) through ``scaled_dot_product_attention``.
    """

    fused_attention: bool = True
    fused_attention_exact: bool = False
    fused_attention_tile: tuple[int, int] = (64, 16)
    fused_fake_quant: bool = True
    fused_noisyquant: bool = True
    float_sdpa: bool = True

    def __post_init__(self) -> None:
        tile = tuple(self.fused_attention_tile)
        if len(tile) != 2 or any(not isinstance(v, int) or v < 16 or v & (v - 1) for v in tile):
            raise ValueError(
                f"fused_attention_tile={list(tile)!r}: expected (rows, keys), two powers of two >= 16 (e.g. 64, 16); "
                "benchmarks/bench_attention.py --tune times the candidates on your card"
            )
        object.__setattr__(self, "fused_attention_tile", tile)
        for f in dataclasses.fields(self):
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be true or false, got {getattr(self, f.name)!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KernelConfig:
        """The configuration the ``REGCACHE_*`` variables give (unset: the defaults)."""
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        for name, var in ENV.items():
            raw = env.get(var, "").strip()
            if not raw:
                continue
            if name == "fused_attention_tile":
                try:
                    kwargs[name] = tuple(int(v) for v in raw.split(","))
                except ValueError:
                    kwargs[name] = ()
                if len(kwargs[name]) != 2:
                    raise ValueError(
                        f"{var}={raw!r}: expected 'rows,keys', two powers of two >= 16 (e.g. '64,16'); "
                        "benchmarks/bench_attention.py --tune times the candidates on your card"
                    )
            elif name == "fused_attention_exact":
                kwargs[name] = raw == "1"
            else:
                kwargs[name] = raw != "0"
        try:
            return cls(**kwargs)
        except ValueError as e:
            tile = env.get(ENV["fused_attention_tile"], "")
            raise ValueError(f"{ENV['fused_attention_tile']}={tile!r}: {e}") from None

    def replace(self, **changes: Any) -> KernelConfig:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        out = dataclasses.asdict(self)
        out["fused_attention_tile"] = list(self.fused_attention_tile)
        return out


_LOCK = threading.Lock()
_CURRENT = [KernelConfig.from_env()]  # read once: a variable set later changes nothing
_FAILED: dict[str, str] = {}  # kernel → reason of its fallback (the op-by-op path from then on)
_FALLBACKS: list[dict[str, str]] = []


def current() -> KernelConfig:
    """The process's kernel configuration."""
    return _CURRENT[0]


def set_kernel_config(config: KernelConfig | None = None, **changes: Any) -> KernelConfig:
    """Set the process's configuration (``config``, else the current one with ``changes``); clears fallbacks.

    Returns the previous configuration.
    """
    with _LOCK:
        previous = _CURRENT[0]
        _CURRENT[0] = (config or previous).replace(**changes)
        _FAILED.clear()
    return previous


@contextlib.contextmanager
def kernel_config(config: KernelConfig | None = None, **changes: Any) -> Iterator[KernelConfig]:
    """Within the block the configuration is ``config`` (or the current one with ``changes``)."""
    previous = _CURRENT[0]
    _CURRENT[0] = (config or previous).replace(**changes)
    try:
        yield _CURRENT[0]
    finally:
        _CURRENT[0] = previous


def active(kernel: str) -> bool:
    """Whether ``kernel`` (a :class:`KernelConfig` field) is on and has not fallen back in this process."""
    return bool(getattr(_CURRENT[0], kernel)) and kernel not in _FAILED


def record_fallback(kernel: str, reason: str) -> None:
    """``kernel`` failed: warn, take its op-by-op path from now on and record it for the run record."""
    with _LOCK:
        first = kernel not in _FAILED
        _FAILED[kernel] = reason
        _FALLBACKS.append({"kernel": kernel, "reason": reason})
    if first:
        warnings.warn(f"{kernel} kernel disabled ({reason}); using the op-by-op path", stacklevel=3)


def fallbacks() -> list[dict[str, str]]:
    """Every fallback taken in this process (kernel, reason), in order."""
    return list(_FALLBACKS)


def record() -> dict[str, Any]:
    """The effective settings for the run record: the configuration, Triton's presence and the fallbacks."""
    return {
        "config": current().to_dict(),
        "triton": importlib.util.find_spec("triton") is not None,
        "fallbacks": fallbacks(),
    }


__all__ = [
    "ENV",
    "KernelConfig",
    "active",
    "current",
    "fallbacks",
    "kernel_config",
    "record",
    "record_fallback",
    "set_kernel_config",
]
