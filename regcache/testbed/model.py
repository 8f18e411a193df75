"""The planted mechanism of massive activations in the testbed's vision tower (see docs: testbed.md).

The tower is a plain open_clip ``VisionTransformer`` (width 128, 6 blocks, 4 heads, patch 8 on a
48x48 canvas). A few residual channels are *reserved*: trained weights never write into them, and
the planted (frozen) weights below are the only ones that do:

- block ``energy_block`` (0): MLP units measure a patch's high-frequency energy from planted
  zero-DC patch filters (``hf`` channels of ``conv1``): exactly zero on any uniform patch;
- block ``cue_block`` (1): a saturating step ``position ∈ corners AND energy ≈ 0`` writes the
  *cue* (a moderate value, ``cue_value``) on low-information corner patches;
- block ``l_q`` (2): "register neurons" read the cue and fire with post-GELU values in the
  hundreds; their fc2 columns write a massive value into two fixed channels (``massive``);
- blocks after ``l_q``: "sink heads" whose key dimension 0 reads the massive channel and whose
  query has a constant bias on that dimension, so massive tokens absorb most attention; their
  value projections ignore the reserved channels (near-zero values on sink tokens). With
  ``sink_value_gain`` > 0 (the committed weights: 4) their value and output projections are planted
  too, so the heads' output on content is damped only by the sink's share of attention: deleting
  the sinks without a register to take their place hurts, as in real encoders.

Planted reads take the difference to a reserved channel that is never written (``zero``), so
the LayerNorm's mean subtraction cancels and a reserved channel reads exactly 0 where nothing was
written. The positional embedding is a frozen 2D sin-cos table plus a "corner" indicator channel.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class TestbedSpec:
    """Where the mechanism is planted and its constants (stored with the weights)."""

    __test__ = False  # not a pytest class

    width: int = 128
    layers: int = 6
    heads: int = 4
    grid: int = 6  # patches per side (48 px canvas / patch 8)
    canvas_size: int = 48
    content_size: int = 32  # the image occupies a content_size² square of the canvas
    energy_block: int = 0
    cue_block: int = 1
    l_q: int = 2
    sink_blocks: tuple[int, ...] = (3, 4, 5)
    sink_heads: tuple[int, ...] = (0, 1, 2)
    # reserved residual channels
    hf_channels: tuple[int, ...] = (120, 121, 122, 123, 124, 125, 126, 127)
    zero_channel: int = 119
    pos_channel: int = 118
    energy_channel: int = 117
    cue_channel: int = 116
    massive_channels: tuple[int, ...] = (37, 101)
    # patches (row, col) whose background becomes a register token
    register_positions: tuple[tuple[int, int], ...] = ((0, 0), (0, 5), (5, 0))
    # constants
    pos_after_ln: float = 4.0  # corner indicator after ln_pre on a background token
    energy_gain: float = 3.0
    energy_write: float = 0.2
    step_pos_gain: float = 3.0
    step_energy_gain: float = 30.0
    step_thresholds: tuple[float, float] = (1.5, 2.5)
    cue_value: float = 20.0
    register_gains: tuple[float, ...] = (64.0, 68.0, 72.0, 76.0)
    register_threshold: float = 40.0
    massive_write: tuple[float, ...] = (0.2, -0.13)
    sink_key: float = 2.0
    sink_query: float = 2.0
    # > 0: the sink heads' value and output projections are planted too (random, this gain), so
    # their content output is only damped by the sink's share of attention: delete the sinks
    # without a replacement and the heads' output grows ~1/(1 - sink mass)-fold (0: trained V/O)
    sink_value_gain: float = 0.0
    # the trained features pass through the MLP of l_q: blocks before it write only the first half
    # of the free channels, the MLP of l_q writes only the second half, blocks after it read only that
    bottleneck: bool = True
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def reserved_channels(self) -> list[int]:
        """Every residual channel the trained weights may not write."""
        return [
            *self.hf_channels,
            self.zero_channel,
            self.pos_channel,
            self.energy_channel,
            self.cue_channel,
            *self.massive_channels,
        ]

    @property
    def register_token_indices(self) -> list[int]:
        """Sequence indices (CLS = 0) of the patches that turn into massive tokens on a uniform canvas."""
        return [1 + r * self.grid + c for r, c in self.register_positions]

    def to_json(self) -> str:
        """Serialize (stored in the safetensors metadata)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TestbedSpec:
        """Inverse of :meth:`to_json` (lists back to tuples)."""
        d = json.loads(text)

        def tup(v):
            return tuple(tup(x) for x in v) if isinstance(v, list) else v

        return cls(**{k: (v if k == "extra" else tup(v)) for k, v in d.items()})


Frozen = dict[str, tuple[torch.Tensor, torch.Tensor]]  # param name -> (mask of frozen entries, their values)


class _Planter:
    """Collects planted values and their masks, parameter by parameter."""

    def __init__(self, model: nn.Module) -> None:
        self.params = dict(model.named_parameters())
        self.frozen: Frozen = {}

    def _entry(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self.frozen:
            p = self.params[name]
            self.frozen[name] = (torch.zeros_like(p, dtype=torch.bool), p.detach().clone())
        return self.frozen[name]

    def set(self, name: str, index, value) -> None:
        """Freeze ``param[index]`` at ``value``."""
        mask, values = self._entry(name)
        mask[index] = True
        values[index] = torch.as_tensor(value, dtype=values.dtype)


def _sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE-style fixed 2D sin-cos positional table (grid², dim)."""
    from open_clip.pos_embed import get_2d_sincos_pos_embed

    return torch.from_numpy(get_2d_sincos_pos_embed(dim, grid, cls_token=False)).float()


def _corner_amplitude(background: torch.Tensor, channel: int, target: float) -> float:
    """Amplitude A with LayerNorm(background + A e_channel)[channel] - (zero level) = ``target``."""
    lo, hi = 0.0, 100.0
    for _ in range(60):
        a = (lo + hi) / 2
        x = background.clone()
        x[channel] = a
        if a / x.std(unbiased=False) < target:
            lo = a
        else:
            hi = a
    return (lo + hi) / 2


def _hf_filters(n: int, patch: int, generator: torch.Generator) -> torch.Tensor:
    """n random zero-DC filters (zero sum per colour channel), unit norm: 0 on any uniform patch."""
    w = torch.randn(n, 3, patch, patch, generator=generator)
    w = w - w.mean(dim=(2, 3), keepdim=True)
    return w / w.flatten(1).norm(dim=1).view(n, 1, 1, 1)


def plant_(model: nn.Module, spec: TestbedSpec) -> Frozen:
    """Write the planted weights into an open_clip CLIP model; return the frozen entries."""
    visual = model.visual
    c = spec.width
    if visual.transformer.width != c or len(visual.transformer.resblocks) != spec.layers:
        raise ValueError("model does not match the testbed spec")
    g = torch.Generator().manual_seed(spec.seed)
    pl = _Planter(model)
    reserved = torch.tensor(spec.reserved_channels)
    free = [i for i in range(c) if i not in set(spec.reserved_channels)]
    early, late = (free[: len(free) // 2], free[len(free) // 2 :]) if spec.bottleneck else (free, [])
    early, late = torch.tensor(early), torch.tensor(late, dtype=torch.long)
    z0 = spec.zero_channel

    # embedding: planted patch filters, frozen positional table with a corner indicator channel
    patch = visual.conv1.weight.shape[-1]
    pl.set("visual.conv1.weight", reserved, 0.0)
    pl.set("visual.conv1.weight", torch.tensor(spec.hf_channels), _hf_filters(len(spec.hf_channels), patch, g))
    pl.set("visual.class_embedding", reserved, 0.0)
    if len(late):
        pl.set("visual.conv1.weight", late, 0.0)
        pl.set("visual.class_embedding", late, 0.0)
        pl.set("visual.proj", torch.cat([early, reserved]), 0.0)  # the output reads the late half only
    pos = torch.zeros(spec.grid**2 + 1, c)
    dim = 4 * (len(early) // 4)
    pos[1:, early[:dim]] = _sincos_2d(dim, spec.grid)
    amp = _corner_amplitude(pos[1], spec.pos_channel, spec.pos_after_ln)
    pos[spec.register_token_indices, spec.pos_channel] = amp
    pl.set("visual.positional_embedding", slice(None), pos)

    # LayerNorms act as identity-affine on reserved channels (difference reads stay exact)
    norms = ["visual.ln_pre"] + [
        f"visual.transformer.resblocks.{i}.{n}" for i in range(spec.layers) for n in ("ln_1", "ln_2")
    ]
    for n in norms:
        pl.set(f"{n}.weight", reserved, 1.0)
        pl.set(f"{n}.bias", reserved, 0.0)

    massive = torch.tensor(spec.massive_channels)
    hd = c // spec.heads
    for i in range(spec.layers):
        b = f"visual.transformer.resblocks.{i}"
        # nothing trained writes reserved channels or reads the massive ones
        pl.set(f"{b}.attn.out_proj.weight", reserved, 0.0)
        pl.set(f"{b}.attn.out_proj.bias", reserved, 0.0)
        pl.set(f"{b}.mlp.c_proj.weight", reserved, 0.0)
        pl.set(f"{b}.mlp.c_proj.bias", reserved, 0.0)
        pl.set(f"{b}.attn.in_proj_weight", (slice(None), massive), 0.0)
        pl.set(f"{b}.mlp.c_fc.weight", (slice(None), massive), 0.0)
        if len(late):
            _plant_bottleneck(pl, b, i, spec.l_q, early, late, reserved)
        if i in spec.sink_blocks:
            for h in spec.sink_heads:
                for part in range(3):  # q, k, v rows of this head ignore every reserved channel
                    rows = torch.arange(part * c + h * hd, part * c + (h + 1) * hd)
                    pl.set(f"{b}.attn.in_proj_weight", (rows[:, None], reserved[None, :]), 0.0)
                if spec.sink_value_gain > 0:
                    _plant_sink_value(pl, spec, b, h, late if len(late) else torch.tensor(free), g)
                q0, k0 = h * hd, c + h * hd
                pl.set(f"{b}.attn.in_proj_weight", q0, 0.0)  # query dim 0: a constant bias
                pl.set(f"{b}.attn.in_proj_bias", q0, spec.sink_query)
                key = torch.zeros(c)
                key[spec.massive_channels[0]] = spec.sink_key
                key[z0] = -spec.sink_key
                pl.set(f"{b}.attn.in_proj_weight", k0, key)
                pl.set(f"{b}.attn.in_proj_bias", k0, 0.0)

    _plant_mlps(pl, spec)
    with torch.no_grad():
        for name, (mask, values) in pl.frozen.items():
            p = pl.params[name]
            p.copy_(torch.where(mask, values, p))
    return pl.frozen


def _plant_bottleneck(
    pl: _Planter, b: str, i: int, l_q: int, early: torch.Tensor, late: torch.Tensor, reserved: torch.Tensor
) -> None:
    """Route the trained features through the MLP of l_q (early half -> late half of the free channels)."""
    if i <= l_q:
        pl.set(f"{b}.attn.out_proj.weight", late, 0.0)
        pl.set(f"{b}.mlp.c_proj.weight", late if i < l_q else early, 0.0)
    else:
        hidden = torch.cat([early, reserved])
        pl.set(f"{b}.attn.in_proj_weight", (slice(None), hidden), 0.0)
        pl.set(f"{b}.mlp.c_fc.weight", (slice(None), hidden), 0.0)
        pl.set(f"{b}.attn.out_proj.weight", early, 0.0)
        pl.set(f"{b}.mlp.c_proj.weight", early, 0.0)


def _plant_sink_value(pl: _Planter, spec: TestbedSpec, b: str, h: int, reads: torch.Tensor, g) -> None:
    """Freeze head h's value rows (random reads of ``reads``, gain ``sink_value_gain``) and its output columns."""
    c, hd = spec.width, spec.width // spec.heads
    rows = torch.arange(2 * c + h * hd, 2 * c + (h + 1) * hd)
    weight = torch.zeros(hd, c)
    weight[:, reads] = spec.sink_value_gain * torch.randn(hd, len(reads), generator=g) / len(reads) ** 0.5
    pl.set(f"{b}.attn.in_proj_weight", rows, weight)
    pl.set(f"{b}.attn.in_proj_bias", rows, 0.0)
    out = torch.zeros(c, hd)
    out[reads] = torch.randn(len(reads), hd, generator=g) / hd**0.5
    pl.set(f"{b}.attn.out_proj.weight", (slice(None), slice(h * hd, (h + 1) * hd)), out)


def _read(spec: TestbedSpec, channel: int, gain: float) -> torch.Tensor:
    """A fc1 row reading ``gain * (x[channel] - x[zero])`` of the LayerNormed stream."""
    row = torch.zeros(spec.width)
    row[channel] = gain
    row[spec.zero_channel] = -gain
    return row


def _plant_unit(pl: _Planter, spec: TestbedSpec, block: int, unit: int, row, bias: float, writes: dict) -> None:
    """Freeze one MLP hidden unit: its fc1 row/bias and its whole fc2 column (``writes``: channel -> weight)."""
    b = f"visual.transformer.resblocks.{block}.mlp"
    pl.set(f"{b}.c_fc.weight", unit, row)
    pl.set(f"{b}.c_fc.bias", unit, bias)
    column = torch.zeros(spec.width)
    for ch, w in writes.items():
        column[ch] = w
    pl.set(f"{b}.c_proj.weight", (slice(None), unit), column)


def _plant_mlps(pl: _Planter, spec: TestbedSpec) -> dict[int, list[int]]:
    """Energy units, cue step and register neurons; returns the planted hidden units per block."""
    units: dict[int, list[int]] = {}
    e = []
    for j, ch in enumerate(spec.hf_channels):  # |x| ≈ gelu(s x) + gelu(-s x): patch energy
        for sign, u in ((1.0, 2 * j), (-1.0, 2 * j + 1)):
            _plant_unit(
                pl, spec, spec.energy_block, u, _read(spec, ch, sign * spec.energy_gain), 0.0,
                {spec.energy_channel: spec.energy_write},
            )  # fmt: skip
            e.append(u)
    units[spec.energy_block] = e
    step_row = _read(spec, spec.pos_channel, spec.step_pos_gain) + _read(
        spec, spec.energy_channel, -spec.step_energy_gain
    )
    t1, t2 = spec.step_thresholds
    # gelu(x - t1) - gelu(x - t2): a step from ≈0 to 1 (saturating), times the cue value
    _plant_unit(pl, spec, spec.cue_block, 0, step_row, -t1, {spec.cue_channel: spec.cue_value})
    _plant_unit(pl, spec, spec.cue_block, 1, step_row, -t2, {spec.cue_channel: -spec.cue_value})
    units[spec.cue_block] = [0, 1]
    writes = dict(zip(spec.massive_channels, spec.massive_write, strict=True))
    regs = []
    for r, gain in enumerate(spec.register_gains):
        _plant_unit(
            pl, spec, spec.l_q, r, _read(spec, spec.cue_channel, gain), -spec.register_threshold, writes
        )  # fmt: skip
        regs.append(r)
    units[spec.l_q] = regs
    return units


@torch.no_grad()
def enforce_frozen_(model: nn.Module, frozen: Frozen) -> None:
    """Restore the planted entries (call after every optimizer step)."""
    params = dict(model.named_parameters())
    for name, (mask, values) in frozen.items():
        p = params[name]
        p.copy_(torch.where(mask.to(p.device), values.to(p.device, p.dtype), p))


def mask_frozen_grads_(model: nn.Module, frozen: Frozen) -> None:
    """Zero the gradients of planted entries (so optimizer moments stay clean)."""
    params = dict(model.named_parameters())
    for name, (mask, _) in frozen.items():
        p = params[name]
        if p.grad is not None:
            p.grad.masked_fill_(mask.to(p.grad.device), 0.0)


def frozen_fraction(model: nn.Module, frozen: Frozen) -> float:
    """Fraction of the vision tower's parameters that are planted."""
    total = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    return sum(int(m.sum()) for m, _ in frozen.values()) / max(total, 1)


__all__ = ["Frozen", "TestbedSpec", "enforce_frozen_", "frozen_fraction", "mask_frozen_grads_", "plant_"]
