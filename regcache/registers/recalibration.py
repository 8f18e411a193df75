"""Reset and re-run a method's calibration, on the whole encoder or only on blocks >= start.

Re-calibration scope. A method's calibration is *depth-causal* when the parameters it picks for
block i depend only on the stream entering block i and on block i itself. Naive min-max is: it
observes every activation with the whole model in float, so block i's ranges depend on the float
stream entering it. For such methods a configuration that changes only blocks >= s (prefix from
l_start, deletion at l_q, s = min(l_start, l_q)) leaves the calibration of blocks < s as it was,
and re-calibrating blocks >= s alone, from the cached stream entering block s, is exact.

``TAIL_CALIBRATION[name]`` says which stream that is: ``"float"`` (the float model's, as naive)
or ``"quantized"`` (the quantized model's, for methods that calibrate block by block on
quantized inputs). A method class may instead declare ``tail_calibration_input`` itself.
Methods not declared (e.g. PTQ4ViT's Hessian-guided search, which looks at the network's
output) are always re-calibrated whole.

Weights. A method whose weight quantizers depend on the weights alone (naive's RTN) may define
``calibrate_activations(encoder, batches, progress)``, with ``calibrate`` = weight quantizers +
``calibrate_activations``. A tail re-calibration then keeps the weight quantizers of the last
calibration (if neither they nor the weights changed since) and re-runs only the activation part,
which overwrites every activation quantizer's range, scale and zero point: the same state as
reset + ``calibrate``, without recomputing ~24 weight ranges per configuration.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch

from regcache.encoders.base import VisionEncoder
from regcache.quant.api import QuantConfig
from regcache.quant.modules import QuantConv2d, QuantLinear, quantizers

TAIL_CALIBRATION: dict[str, str] = {"naive": "float"}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def tail_calibration_input(config: QuantConfig) -> str | None:
    """``"float"`` / ``"quantized"`` if ``config`` can be re-calibrated on a tail of blocks, else None."""
    return getattr(type(config), "tail_calibration_input", None) or TAIL_CALIBRATION.get(config.name)


def calibrates_activations_alone(config: QuantConfig) -> bool:
    """Whether ``config`` re-calibrates with unchanged weights by ``calibrate_activations`` alone (see above)."""
    cls = type(config)
    if config.modifies_weights or not callable(getattr(cls, "calibrate_activations", None)):
        return False
    # a subclass overriding calibrate below the class that defines calibrate_activations breaks the contract
    owner = next(c for c in cls.__mro__ if "calibrate" in c.__dict__)
    return any("calibrate_activations" in c.__dict__ for c in cls.__mro__[: cls.__mro__.index(owner) + 1])


def _weight_key(layer: torch.nn.Module) -> tuple[Any, ...] | None:
    """Identity and in-place version of a layer's weight and weight-quantizer buffers (None: not trackable)."""
    q = layer.weight_quantizer
    tensors = [layer.weight, *q.buffers()]
    if any(t.is_inference() for t in tensors):
        return None
    return tuple((t, t._version, t.data_ptr()) for t in tensors)


def _same(a: tuple[Any, ...] | None, b: tuple[Any, ...] | None) -> bool:
    if a is None or b is None or len(a) != len(b):
        return False
    return all(x[0] is y[0] and x[1:] == y[1:] for x, y in zip(a, b, strict=True))


def _block_index(key: str) -> int | None:
    m = _BLOCK.match(key)
    return int(m.group(1)) if m else None


class TailView(VisionEncoder):
    """Blocks ``start..`` of an encoder as an encoder whose "images" are residual streams.

    Shares the blocks (a method calibrating it calibrates them) but not the embedding or the
    earlier blocks, so ``config.calibrate(view, streams)`` touches only the tail. Block indices
    inside the view start at 0.
    """

    def __init__(self, encoder: VisionEncoder, start: int) -> None:
        super().__init__(list(encoder.blocks[start:]), encoder.num_prefix_tokens, encoder.embed_dim, encoder.source)
        object.__setattr__(self, "_full", encoder)  # not a submodule: its other modules stay untouched
        self.family = encoder.family
        self.quant_config = getattr(encoder, "quant_config", None)
        self.start = start

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Identity: the view's inputs are already the residual stream entering block ``start``."""
        return images

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The full encoder's pooling and projection, so the view's outputs are final embeddings."""
        return self._full.pool(tokens)


class Recalibrator:
    """Holds a transformed encoder's pre-calibration state to reset and re-calibrate it at will.

    The snapshot holds every quantizer's buffers, plus the block weights when the method edits
    weights (``modifies_weights``), so re-calibration never folds twice.
    """

    def __init__(self, encoder: VisionEncoder) -> None:
        self.encoder = encoder
        self.config: QuantConfig = encoder.quant_config
        self.tail_input = tail_calibration_input(self.config)
        # Looked up once: a search resets and re-calibrates ~1,000 times, and walking the module
        # tree (``load_state_dict``, ``quantizers``) each time cost more than the tail's calibration.
        self._modules = dict(encoder.named_modules())
        self._quantizers = [(name, q, _block_index(name + ".")) for name, q in quantizers(encoder)]
        self._views: dict[int, TailView] = {}
        self._activation_only = calibrates_activations_alone(self.config)
        self._weight_layers = [
            (m, _block_index(name + "."))
            for name, m in self._modules.items()
            if isinstance(m, (QuantLinear, QuantConv2d)) and m.weight_quantizer is not None
        ]
        self._weight_keys: dict[int, tuple[Any, ...] | None] = {}  # id(layer) -> _weight_key at the last calibration
        self.initial = self.state()

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the current quantization state (quantizer buffers, edited weights)."""
        owners = {n for n, _, _ in self._quantizers}
        out = {}
        for key, t in self.encoder.state_dict().items():
            if key.rpartition(".")[0] in owners or (self.config.modifies_weights and key.startswith("blocks.")):
                out[key] = t.detach().clone()
        return out

    @staticmethod
    def _in_range(key: str, start: int, end: int | None) -> bool:
        block = _block_index(key)
        if block is None:  # outside the blocks (e.g. a quantized head): belongs to the whole model
            return start == 0 and end is None
        return block >= start and (end is None or block < end)

    def load(self, state: dict[str, Any], start: int = 0, end: int | None = None) -> None:
        """Restore ``state`` for blocks in [start, end).

        Same effect as ``encoder.load_state_dict(subset, strict=False)`` (each owning module's own
        ``_load_from_state_dict``, so quantizers still resize their buffers), without walking
        every module of the encoder.
        """
        owners = {key.rpartition(".")[0] for key in state if self._in_range(key, start, end)}
        errors: list[str] = []
        for owner in sorted(owners):
            module = self._modules.get(owner)
            if module is None:  # not a module path (cannot happen for keys taken from state_dict)
                raise KeyError(f"no module {owner!r} in the encoder")
            module._load_from_state_dict(state, owner + ".", {}, False, [], [], errors)
        if errors:
            raise RuntimeError("error(s) restoring the quantization state:\n\t" + "\n\t".join(errors))

    def reset(self, start: int = 0) -> None:
        """Back to the uncalibrated state (float mode) for blocks >= start."""
        self.load(self.initial, start)
        for _, q, block in self._quantizers:
            if (start == 0) if block is None else block >= start:
                q.mode = "float"

    def recalibrate(self, batches: Iterable[Any], start: int = 0, streams: bool | None = None) -> None:
        """Reset blocks >= start and run the method's calibration on them (activations only, see above, if enough).

        ``streams`` (default: ``start > 0``): ``batches`` are the residual streams entering block
        ``start`` (see :data:`TAIL_CALIBRATION`) and only blocks >= start are calibrated; otherwise
        ``batches`` are images and the whole model is calibrated.
        """
        streams = start > 0 if streams is None else streams
        if streams and self.tail_input is None:
            raise ValueError(f"{self.config.tag} is not declared depth-causal: re-calibrate the whole model")
        if streams:
            target = self._views.get(start)
            if target is None:
                target = self._views[start] = TailView(self.encoder, start)
        else:
            target = self.encoder
        layers = [m for m, block in self._weight_layers if ((start == 0) if block is None else block >= start)]
        with torch.inference_mode(False):
            if self._activation_only and all(_same(self._weight_keys.get(id(m)), _weight_key(m)) for m in layers):
                self.config.calibrate_activations(target, batches, progress=False)
                return
            self.reset(start)
            self.config.calibrate(target, batches, progress=False)
            self._weight_keys.update((id(m), _weight_key(m)) for m in layers)

    def head_unchanged(self, reference: dict[str, torch.Tensor], end: int) -> bool:
        """Whether blocks < end hold exactly the quantization state in ``reference``.

        Compares without copying the state and with one host sync per device (not one per tensor).
        """
        now = self.encoder.state_dict()
        flags: dict[torch.device, list[torch.Tensor]] = {}
        for key, ref in reference.items():
            block = _block_index(key)
            if block is not None and block >= end:
                continue
            t = now.get(key)
            if t is None or t.shape != ref.shape or t.dtype != ref.dtype:
                return False
            if t.numel():
                flags.setdefault(t.device, []).append((t == ref.to(t.device)).all())
        return all(bool(torch.stack(f).all()) for f in flags.values())
