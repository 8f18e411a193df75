"""Register KV caches: derive (a registry of derivations), save, load.

A :class:`RegisterCache` holds, for every block ``l >= l_start``, the per-head keys and values of
``n`` register entries, shape ``(heads, n, head_dim)``, taken after the qkv projection and the
q/k norms and before any quantizer (exactly what :class:`~regcache.encoders.AttentionPrefix`
prepends). It is input independent: derived once from the float encoder, stored as safetensors
with JSON metadata, and refused by a model with other weights.

Derivations (``DERIVATIONS``):

- ``propagate`` (default): each candidate ``z`` is a one-token sequence entering block
  ``l_start`` and run through the float blocks ``l_start..L-1``; K/V are read at every block. In
  a one-token sequence the register attends only to itself. We run it without its own prefix:
  with one the result would be the same, because at every block the prefix entry would carry
  the very key and value the token itself has, so attention over [prefix x τ; self] returns
  that value for any τ. One entry per candidate (candidates are independent sequences, batched).
- ``in_context``: K/V of each candidate token at its position in the float forward of its source
  image (``source_images`` aligned with the candidates); ``average=True`` averages all
  candidates' K/V into one entry.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from regcache.encoders.base import AttentionPrefix, VisionEncoder
from regcache.registers._common import device_dtype, float_fingerprint, plain_float, require_float
from regcache.registers.curation import Candidates

KV = dict[int, tuple[torch.Tensor, torch.Tensor]]
Derivation = Callable[..., KV]
DERIVATIONS: dict[str, Derivation] = {}


def register_derivation(name: str) -> Callable[[Derivation], Derivation]:
    """Decorator adding a derivation ``fn(encoder, candidates, l_start, **options) -> {layer: (K, V)}``.

    K and V per layer have shape ``(heads, n, head_dim)``.
    """

    def deco(fn: Derivation) -> Derivation:
        DERIVATIONS[name] = fn
        return fn

    return deco


@dataclass
class RegisterCache:
    """Register keys/values per block ``>= l_start`` plus what they were derived from."""

    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    l_start: int
    derivation: str
    model_name: str
    fingerprint: str
    provenance: list[dict[str, Any]] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        """Blocks this cache has entries for."""
        return sorted(self.keys)

    @property
    def num_entries(self) -> int:
        """Distinct register entries n."""
        return next(iter(self.keys.values())).shape[1]

    def entry(self, index: int) -> RegisterCache:
        """A cache holding only register entry ``index`` (one candidate's register)."""
        prov = [self.provenance[index]] if len(self.provenance) == self.num_entries else self.provenance
        return RegisterCache(
            {l: k[:, index : index + 1] for l, k in self.keys.items()},
            {l: v[:, index : index + 1] for l, v in self.values.items()},
            self.l_start,
            self.derivation,
            self.model_name,
            self.fingerprint,
            prov,
            self.options,
        )

    def to(self, device: torch.device | str) -> RegisterCache:
        """This cache with its keys and values on ``device`` (metadata shared)."""
        return dataclasses.replace(
            self,
            keys={l: k.to(device) for l, k in self.keys.items()},
            values={l: v.to(device) for l, v in self.values.items()},
        )

    def prefix(
        self, layer: int, tau: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> AttentionPrefix:
        """The :class:`AttentionPrefix` of block ``layer`` with every entry counted τ times (τ >= 1).

        τ is also kept on the host (``multiplicity``) so float SDPA can repeat the entries instead of masking.
        """
        if tau < 1:
            raise ValueError(f"tau must be >= 1 for an installed prefix, got {tau}")
        keys = self.keys[layer].unsqueeze(0).to(device=device, dtype=dtype)
        values = self.values[layer].unsqueeze(0).to(device=device, dtype=dtype)
        log_tau = torch.full((1, 1, 1, 1), float(torch.tensor(float(tau)).log()), device=device, dtype=dtype)
        return AttentionPrefix(keys, values, log_tau, multiplicity=(int(tau),) * keys.shape[-2])

    def metadata(self) -> dict[str, Any]:
        """JSON-able description (everything but the tensors)."""
        return {
            "model_name": self.model_name,
            "fingerprint": self.fingerprint,
            "l_start": self.l_start,
            "derivation": self.derivation,
            "options": self.options,
            "layers": self.layers,
            "num_entries": self.num_entries,
            "provenance": self.provenance,
        }

    def save(self, path: str | Path) -> Path:
        """Write tensors (safetensors) with the metadata embedded and beside it as ``<path>.json``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"keys.{l}": k.detach().float().cpu().contiguous() for l, k in self.keys.items()}
        tensors |= {f"values.{l}": v.detach().float().cpu().contiguous() for l, v in self.values.items()}
        meta = json.dumps(self.metadata())
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(tensors, str(tmp), metadata={"regcache": meta})
        tmp.replace(path)
        path.with_suffix(path.suffix + ".json").write_text(json.dumps(self.metadata(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, encoder: VisionEncoder) -> RegisterCache:
        """Load a cache for ``encoder``; refuses (``ValueError``) one made for other weights."""
        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["regcache"])
        fp = float_fingerprint(encoder)
        if meta["fingerprint"] != fp:
            raise ValueError(
                f"{path} holds registers of {meta['model_name']} (weights fingerprint {meta['fingerprint']}); "
                f"this encoder's float weights have fingerprint {fp}: derive a cache for this model instead"
            )
        device, dtype = device_dtype(encoder)
        tensors = load_file(str(path), device=str(device))
        keys = {int(k.split(".")[1]): t.to(dtype) for k, t in tensors.items() if k.startswith("keys.")}
        values = {int(k.split(".")[1]): t.to(dtype) for k, t in tensors.items() if k.startswith("values.")}
        return cls(
            keys,
            values,
            meta["l_start"],
            meta["derivation"],
            meta["model_name"],
            meta["fingerprint"],
            meta["provenance"],
            meta.get("options", {}),
        )


def derive_cache(
    encoder: VisionEncoder,
    candidates: Candidates,
    l_start: int,
    derivation: str = "propagate",
    model_name: str | None = None,
    **options: Any,
) -> RegisterCache:
    """Derive a register cache from candidates with a registered derivation (float encoder)."""
    if derivation not in DERIVATIONS:
        raise KeyError(f"unknown derivation {derivation!r}; available: {sorted(DERIVATIONS)}")
    if not 0 <= l_start < encoder.num_blocks:
        raise ValueError(f"l_start must be in [0, {encoder.num_blocks}), got {l_start}")
    require_float(encoder, "deriving a register cache")
    with torch.no_grad(), plain_float(encoder):
        kv = DERIVATIONS[derivation](encoder, candidates, l_start, **options)
    saved_options = {k: v for k, v in options.items() if isinstance(v, (bool, int, float, str))}
    return RegisterCache(
        {l: k for l, (k, _) in kv.items()},
        {l: v for l, (_, v) in kv.items()},
        l_start,
        derivation,
        model_name or encoder.source or type(encoder).__name__,
        float_fingerprint(encoder),
        candidates.provenance(),
        saved_options,
    )


def _entries(t: torch.Tensor) -> torch.Tensor:
    """(M, heads, 1, D) per-candidate tensors → (heads, M, D) entries."""
    return t[:, :, 0].transpose(0, 1).contiguous()


@register_derivation("propagate")
def propagate(encoder: VisionEncoder, candidates: Candidates, l_start: int) -> KV:
    """Run each candidate as a one-token sequence through float blocks l_start..L-1; read K/V per block."""
    device, dtype = device_dtype(encoder)
    x = candidates.vectors.to(device=device, dtype=dtype).unsqueeze(1)  # (M, 1, C): M independent sequences
    out: KV = {}
    for layer in range(l_start, encoder.num_blocks):
        block = encoder.blocks[layer]
        _, k, v = block.attn.project_qkv(block.norm1(x))
        out[layer] = (_entries(k), _entries(v))
        x = block(x)
    return out


@register_derivation("in_context")
def in_context(
    encoder: VisionEncoder, candidates: Candidates, l_start: int, source_images: torch.Tensor, average: bool = False
) -> KV:
    """K/V of each candidate token inside its source image's float forward (optionally averaged)."""
    if source_images.shape[0] != len(candidates):
        raise ValueError(f"need one source image per candidate: {source_images.shape[0]} for {len(candidates)}")
    device, dtype = device_dtype(encoder)
    rows = torch.arange(len(candidates), device=device)
    tokens = candidates.token_index.to(device)
    out: KV = {}
    x = encoder.forward_blocks(encoder.embed(source_images.to(device=device, dtype=dtype)), 0, l_start)
    for layer in range(l_start, encoder.num_blocks):
        block = encoder.blocks[layer]
        _, k, v = block.attn.project_qkv(block.norm1(x))  # (M, heads, N, D)
        k, v = k[rows, :, tokens].unsqueeze(2), v[rows, :, tokens].unsqueeze(2)
        if average:
            k, v = k.mean(dim=0, keepdim=True), v.mean(dim=0, keepdim=True)
        out[layer] = (_entries(k), _entries(v))
        x = block(x)
    return out
