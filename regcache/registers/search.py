"""Grid search over (register, τ, k̃, l_start): the RegCache configuration that scores best.

Per configuration the register prefix (τ copies, blocks >= l_start) and token deletion (k̃ at
l_q) are installed on the quantized encoder, the base method is re-calibrated with them in place
(the paper's protocol), and the objective is measured on the reference images.

What is computed once (strategy ``"cached"``):

- the float model's reference embeddings (label-free objectives; the patch tokens for ``patch_cosine``,
  whatever the objective's ``readout`` gives) and the register caches (one
  batched derivation per l_start);
- the stream entering block s = min(l_start, l_q), per reference batch, through the *quantized*
  blocks < s, and per calibration batch through the float (or quantized, see
  :mod:`regcache.registers.recalibration`) blocks < s. A configuration changes nothing before s,
  and for depth-causal methods (naive) the calibration of blocks < s does not change either, so
  only blocks >= s are re-calibrated and run. For other methods the whole model is re-calibrated;
  the cached reference streams are reused only if the calibration of blocks < s came out
  bit-identical (checked), otherwise that configuration runs the full model.

``recalibrate="once"`` (an approximation, off by default) calibrates the plain model once and
runs many (register, τ) configurations of one (k̃, l_start) as one batch: sample ``p*B + b`` is
reference image b under configuration p, with per-sample prefixes (``AttentionPrefix`` with P =
batch). Under per-configuration re-calibration the quantizers differ between configurations, so
there configurations run one after another.

``strategy="naive_loop"`` is the straightforward reference: every configuration re-calibrates and
runs the full quantized model on every reference image. Both strategies give the same numbers.

Throughput (per configuration, the work is one re-calibration of blocks >= s on the cached
calibration streams and one tail forward of the reference streams):

- ``eval_batch_size``: the reference images (streams) are re-split into near-equal chunks of at
  most this many images (``None``: as given). Both strategies use the same chunks.
- The objective's reduction stays on the device (``Objective.score``; its labels are moved there
  once, ``Objective.to``: a host tensor would be copied per score, a blocking copy that drains the
  GPU queue between configurations); the score of configuration
  i is read (host sync) only after configuration i+1's work is queued, so Python overhead
  overlaps device work.
- ``compile_tail=True`` (opt-in) runs the tail blocks of configurations that carry a prefix
  through one ``torch.compile``d block function shared by every block: parameters, quantizer
  scales (buffers) and the prefix (one entry per register, ``ln τ`` a tensor) are graph inputs,
  not constants, so all tail blocks reuse one graph; each block's input filter (the token
  deletion, which sets the token count) runs eagerly in front of it, with the token dimension
  marked dynamic. The whole grid, every l_start and k̃ included, compiles one graph for blocks
  with a prefix (plus one for prefix-less blocks between l_q and a later l_start), a sixth of
  compiling the 6-block tail of ViT-B/16 as one graph (measured with ``torch._dynamo`` counters
  in the tests). Configurations without a prefix (base, deletion only) run eagerly. Compiled kernels round
  differently (fused fp32 fake-quant, other softmax kernels; ``emulate_precision_casts`` keeps the
  bf16 roundings eager has), so scores match the eager path to float tolerance, not bit for bit:
  5e-6 on the tiny model in fp32 (CPU, inductor); the benchmark reports the bf16 difference.

The state (every finished configuration's row) is written atomically at most every
``save_every_s`` seconds, at the end, and on any exception (KeyboardInterrupt included), so an
interrupted search resumes where it stopped; a hard kill (SIGKILL, node loss) loses at most the
configurations of the last ``save_every_s`` seconds (0 writes after every configuration).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import numbers
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from regcache.encoders.base import VisionEncoder
from regcache.quant.api import QuantConfig, quantize_
from regcache.quant.calibration import batch_images
from regcache.quant.fused_attention import enabled as fused_attention_enabled
from regcache.quant.fused_attention import enabled_as as fused_attention_as
from regcache.quant.modules import quant_mode
from regcache.registers._common import device_dtype, float_fingerprint, plain_float
from regcache.registers.cache import RegisterCache, derive_cache
from regcache.registers.curation import Candidates
from regcache.registers.deletion import TokenDeletion, install_deletion, remove_deletion
from regcache.registers.objectives import Objective
from regcache.registers.prefix import install_batched_prefix, install_prefix, prefix_layers, remove_prefix
from regcache.registers.recalibration import Recalibrator
from regcache.utils import write_json

log = logging.getLogger(__name__)

MODES = ("base", "prefix", "delete", "both")
# RegCache as the paper tunes it: a register prefix, with k̃ from delete_ks (0 = the prefix alone)
REGCACHE_MODES = ("prefix", "both")
Strategy = Literal["cached", "naive_loop"]


@dataclass(frozen=True)
class SearchPoint:
    """One configuration: register entry (None = no prefix), τ (0 = no prefix), k̃, l_start.

    A grid point is the first four fields (they alone make its identity, ``==`` and ``hash``). The
    winner of a search (:func:`regcache.registers.pipeline.choose`) also carries what installing it
    needs: l_q (where k̃ deletes), ``prefix_only_at``, the deletion's mode / refill, its score and
    the register's KV entry (``cache``), so :meth:`install` puts it on an encoder by itself.
    """

    register: int | None
    tau: int
    delete_k: int
    l_start: int
    l_q: int | None = field(default=None, compare=False)
    prefix_only_at: int | None = field(default=None, compare=False)
    delete_mode: str = field(default="drop", compare=False)
    refill: str = field(default="input", compare=False)
    score: float | None = field(default=None, compare=False)
    cache: RegisterCache | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        """Stable identifier used in the saved state."""
        return f"r{self.register}-t{self.tau}-k{self.delete_k}-s{self.l_start}"

    @property
    def mode(self) -> str:
        """Which ablation this is: base, prefix, delete or both."""
        has_prefix = self.register is not None and self.tau > 0
        return {(False, False): "base", (True, False): "prefix", (False, True): "delete", (True, True): "both"}[
            (has_prefix, self.delete_k > 0)
        ]

    def install(self, encoder: VisionEncoder) -> None:
        """Put this configuration on ``encoder`` (float, before the method is attached): the register prefix
        (τ copies, blocks >= l_start or only ``prefix_only_at``) and the deletion of k̃ tokens at l_q; any
        earlier prefix / deletion is removed first."""
        if self.mode in ("prefix", "both") and self.cache is None:
            raise ValueError(
                f"{self.key} has a register prefix but carries no register cache: take the point from "
                "regcache.registers.choose / RegCacheResult.point, or SearchPoint.from_dict(row, cache=entry)"
            )
        if self.delete_k > 0 and self.l_q is None:
            raise ValueError(f"{self.key} deletes k̃ = {self.delete_k} tokens but carries no l_q: give l_q")
        remove_prefix(encoder)
        remove_deletion(encoder)
        if self.mode in ("prefix", "both"):
            install_prefix(encoder, self.cache, self.tau, only=self.prefix_only_at)
        if self.delete_k > 0:
            install_deletion(encoder, self.l_q, self.delete_k, self.delete_mode, self.refill)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: the search table's row fields (key, register, τ, k̃, l_start, mode, score) plus
        where it installs (l_q, prefix_only_at, delete_mode, refill); the register's K/V stay in its cache file."""
        out = {"key": self.key, "register": self.register, "tau": self.tau, "delete_k": self.delete_k}
        out |= {"l_start": self.l_start, "mode": self.mode, "score": self.score, "l_q": self.l_q}
        return out | {"prefix_only_at": self.prefix_only_at, "delete_mode": self.delete_mode, "refill": self.refill}

    @classmethod
    def from_dict(cls, data: dict[str, Any], cache: RegisterCache | None = None) -> SearchPoint:
        """The point of :meth:`to_dict`'s form or of a search table row (extra keys ignored), with ``cache``
        (the register's entry) for :meth:`install`."""
        names = ("l_q", "prefix_only_at", "delete_mode", "refill", "score")
        context = {n: data[n] for n in names if n in data}
        return cls(data["register"], data["tau"], data["delete_k"], data["l_start"], cache=cache, **context)


# the grid's integer fields: the smallest valid value and what the value means (for the error message)
GRID_FIELDS = {
    "taus": (1, "τ is how many times the register prefix is repeated; the paper's grid is 1..15"),
    "delete_ks": (0, "k̃ is how many massive tokens are deleted at l_q, 0 = no deletion"),
    "l_starts": (0, "a block index where the prefix starts"),
    "l_start_offsets": (0, "l_start = l_q - offset, 0 = the prefix starts at l_q"),
}


def check_grid(**fields: Sequence[int] | None) -> None:
    """Raise a ValueError naming the field and the fix unless every given grid field is a non-empty list of valid ints.

    A field given as None is left to its default; an empty list is an error, since it would either
    drop the dimension or silently stand for a default grid.
    """
    for name, values in fields.items():
        if values is None:
            continue
        minimum, meaning = GRID_FIELDS[name]
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise ValueError(f"{name} must be a list of integers >= {minimum}, got {values!r} ({meaning})")
        values = list(values)
        if not values:
            raise ValueError(
                f"{name} is empty: give at least one integer >= {minimum}, or leave {name} out for the default "
                f"({meaning})"
            )
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum]
        if bad:
            raise ValueError(
                f"{name} must hold integers >= {minimum}, got {bad!r} in {values!r}: remove or correct them ({meaning})"
            )


def search_grid(
    num_registers: int,
    taus: Sequence[int],
    delete_ks: Sequence[int],
    l_starts: Sequence[int],
    modes: Sequence[str] = ("both",),
    include_base: bool = True,
) -> list[SearchPoint]:
    """The configurations of the requested ablations (prefix only / delete only / both), without repeats."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    if not modes:
        raise ValueError(f"modes is empty: give at least one of {MODES}")
    check_grid(taus=taus, delete_ks=delete_ks, l_starts=l_starts)
    points = [SearchPoint(None, 0, 0, l_starts[0])] if include_base or "base" in modes else []
    if "delete" in modes:
        points += [SearchPoint(None, 0, k, l_starts[0]) for k in delete_ks if k > 0]
    if "prefix" in modes:
        points += [SearchPoint(r, t, 0, s) for s, r, t in itertools.product(l_starts, range(num_registers), taus)]
    if "both" in modes:
        grid = itertools.product(l_starts, delete_ks, range(num_registers), taus)
        points += [SearchPoint(r, t, k, s) for s, k, r, t in grid]
    return list(dict.fromkeys(points))


@dataclass
class SearchResult:
    """Every configuration tried with its score, best first."""

    spec: dict[str, Any]
    rows: list[dict[str, Any]]
    greater_is_better: bool
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ranked(self) -> list[dict[str, Any]]:
        """Rows sorted best first."""
        sign = -1.0 if self.greater_is_better else 1.0
        return sorted(self.rows, key=lambda r: (sign * r["score"], r["key"]))

    @property
    def best(self) -> dict[str, Any]:
        """The winning configuration's row, whatever its mode (the base included)."""
        return self.ranked[0]

    def best_of(self, modes: Iterable[str]) -> dict[str, Any]:
        """The best row whose mode is one of ``modes`` (an ablation installs this, not :attr:`best`)."""
        wanted = set(modes)
        unknown = wanted - set(MODES)
        if unknown:
            raise ValueError(f"unknown modes {sorted(unknown)}; choose from {MODES}")
        for row in self.ranked:
            if row["mode"] in wanted:
                return row
        present = sorted({r["mode"] for r in self.rows})
        raise ValueError(f"no configuration of mode {sorted(wanted)} was searched (the table has {present})")

    def best_by_mode(self) -> dict[str, dict[str, Any]]:
        """``{mode: best row of that mode}`` for every mode in the table, in :data:`MODES` order."""
        out: dict[str, dict[str, Any]] = {}
        for row in self.ranked:
            out.setdefault(row["mode"], row)
        return {m: out[m] for m in MODES if m in out}

    def gain(self, row: dict[str, Any], over: dict[str, Any]) -> float:
        """How much better ``row`` scores than ``over`` (positive: better, whichever way the objective points)."""
        diff = row["score"] - over["score"]
        return diff if self.greater_is_better else -diff

    def scores(self) -> dict[str, float]:
        """``{key: score}``."""
        return {r["key"]: r["score"] for r in self.rows}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        out = {"spec": self.spec, "best": self.best, "table": self.ranked, "stats": self.stats}
        return out | {"greater_is_better": self.greater_is_better}

    @classmethod
    def from_dict(cls, data: dict[str, Any], greater_is_better: bool | None = None) -> SearchResult:
        """The result of :meth:`to_dict` (a saved ``search_result.json``); ``greater_is_better`` for files
        written before it was stored."""
        if greater_is_better is None:
            if "greater_is_better" not in data:
                raise ValueError("the saved search result does not say which way its objective ranks: pass it")
            greater_is_better = data["greater_is_better"]
        return cls(data["spec"], data["table"], greater_is_better, data.get("stats", {}))

    def save(self, path: str | Path) -> Path:
        """Write the ranked table and the winner as JSON (atomically)."""
        return write_json(path, self.to_dict())


# the dtypes a search can run in (by name, as configs give them)
SEARCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _images(batches: Iterable[Any]) -> list[torch.Tensor]:
    return [batch_images(b) for b in batches]


class RegisterSearch:
    """Grid search of RegCache configurations for a float encoder and a base PTQ method.

    ``calibration`` / ``reference``: re-iterable image batches (tensors, tuples or dicts); each
    calibration batch is one forward per configuration, so pass full batches (the datamodules'
    ``CanonicalBatches``: six per-worker batches of 5 cost far more than one of 32, BENCHMARKS.md §1);
    ``objective`` scores its ``readout`` of the reference images (the final embeddings; ``patch_cosine``:
    the patch tokens), labels in reference order.
    Register caches come from ``caches`` ({l_start: cache}) or are derived from ``candidates``.
    ``prefix_only_at``: install the prefix only in that block (DINOv2 v4: l_q).
    ``cache_device``: where cached streams live (default: the encoder's device; "cpu" for big pools).
    ``eval_batch_size``: reference images per forward (None: the given batches); ``compile_tail``:
    ``torch.compile`` the tail of prefixed configurations (opt-in, see the module docstring);
    ``save_every_s``: at most this long between writes of the resumable state; ``fused_attention``:
    run the attention of quantized forwards as one Triton kernel (:mod:`regcache.quant.fused_attention`,
    scores to float tolerance; None: on for a compiled tail on CUDA, where it was measured faster).
    ``delete_mode`` / ``refill``: how k̃ > 0 deletes (:class:`~regcache.registers.deletion.TokenDeletion`:
    ``"drop"``, the paper's shorter sequence, or ``"keep"``, the full token grid refilled after the last block).
    ``dtype``: run the grid (float embeddings, quantized copy, calibration, streams) on a copy of the
    encoder cast to this dtype (None: the encoder's own); register caches still come from the given
    encoder. ``torch.bfloat16`` on GPUs is the fast setting (BENCHMARKS.md §1); scores then carry
    bf16 rounding.
    """

    def __init__(
        self,
        encoder: VisionEncoder,
        config: QuantConfig,
        calibration: Iterable[Any],
        reference: Iterable[Any],
        objective: Objective,
        l_q: int,
        candidates: Candidates | None = None,
        *,
        caches: dict[int, RegisterCache] | None = None,
        taus: Sequence[int] = range(1, 16),
        delete_ks: Sequence[int] = (0, 1, 2, 4, 8),
        l_starts: Sequence[int] | None = None,
        modes: Sequence[str] = ("both",),
        include_base: bool = True,
        derivation: str = "propagate",
        derivation_options: dict[str, Any] | None = None,
        prefix_only_at: int | None = None,
        recalibrate: Literal["per_config", "once"] = "per_config",
        configs_per_batch: int = 8,
        cache_device: torch.device | str | None = None,
        state_path: str | Path | None = None,
        progress: bool = True,
        eval_batch_size: int | None = None,
        compile_tail: bool = False,
        save_every_s: float = 10.0,
        fused_attention: bool | None = None,
        dtype: torch.dtype | None = None,
        delete_mode: str = "drop",
        refill: str = "input",
    ) -> None:
        if getattr(encoder, "quant_config", None) is not None:
            raise ValueError("pass the float encoder: the search quantizes its own copy")
        if dtype is not None and dtype not in SEARCH_DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(map(str, SEARCH_DTYPES.values()))}, got {dtype!r}")
        if recalibrate not in ("per_config", "once"):
            raise ValueError(f"recalibrate must be 'per_config' or 'once', got {recalibrate!r}")
        check_grid(taus=taus, delete_ks=delete_ks, l_starts=l_starts)  # before any model work
        TokenDeletion(0, 0, delete_mode, refill)  # a bad mode / refill fails here, before any model work
        self.delete_mode, self.refill = delete_mode, refill
        self.config = config
        self.calibration = _images(calibration)
        self.reference = _images(reference)
        self.l_q = l_q
        self.l_starts = list(l_starts) if l_starts is not None else [l_q]
        self.prefix_only_at = prefix_only_at
        self.recalibrate_mode = recalibrate
        self.configs_per_batch = configs_per_batch
        self.state_path = Path(state_path) if state_path is not None else None
        self.progress = progress
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self.eval_batch_size = eval_batch_size
        self.compile_tail = compile_tail
        self.save_every_s = save_every_s
        source = encoder  # the caller's float model: register caches and the fingerprint come from it
        if dtype is not None and dtype != device_dtype(encoder)[1]:
            encoder = copy.deepcopy(encoder).to(dtype)  # the grid's own copy in that dtype
        self.encoder = encoder
        self.device, self.dtype = device_dtype(encoder)
        self.objective = objective.to(self.device)  # scores then read no host tensors (no sync per configuration)
        if fused_attention is None:  # the process setting (on by default; the kernel applies on CUDA only)
            fused_attention = fused_attention_enabled()
        self.fused_attention = fused_attention
        self._compiled_block: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None
        self._prefixes: dict[tuple[Any, ...], list[tuple[int, Any]]] = {}
        self.cache_device = torch.device(cache_device) if cache_device is not None else self.device
        if caches is None:
            if candidates is None:
                raise ValueError("give candidates (to derive register caches) or caches")
            with torch.no_grad():
                caches = {
                    s: derive_cache(source, candidates, s, derivation, **(derivation_options or {}))
                    for s in self.l_starts
                }
        missing = set(self.l_starts) - set(caches)
        if missing:
            raise ValueError(f"no register cache for l_start {sorted(missing)}")
        self.caches = caches
        num_registers = min(caches[s].num_entries for s in self.l_starts)
        self.points = search_grid(num_registers, taus, delete_ks, self.l_starts, modes, include_base)
        self.quantized: VisionEncoder | None = None
        self._prepared_for: str | None = None
        self.spec = {
            "method": config.to_dict(),
            "objective": objective.name,
            "model_fingerprint": float_fingerprint(source),
            "l_q": l_q,
            "l_starts": self.l_starts,
            "prefix_only_at": prefix_only_at,
            "derivation": caches[self.l_starts[0]].derivation,
            "recalibrate": recalibrate,
            "calibration_images": sum(x.shape[0] for x in self.calibration),
            "reference_images": sum(x.shape[0] for x in self.reference),
            "points": [p.key for p in self.points],
        }
        if delete_mode != "drop":  # the output grid differs (drop's specs stay as they were)
            self.spec["delete_mode"], self.spec["refill"] = delete_mode, refill
        if dtype is not None:  # scores differ between dtypes: a resumed state must come from the same one
            self.spec["dtype"] = str(self.dtype).removeprefix("torch.")

    # ---- state ------------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, dict[str, Any]]:
        if self.state_path is None or not self.state_path.is_file():
            return {}
        state = json.loads(self.state_path.read_text())
        if state["spec"] != self.spec:
            raise ValueError(
                f"{self.state_path} belongs to a different search (other model, method, grid or data); "
                "remove it or pass another state_path"
            )
        return {row["key"]: row for row in state["rows"]}

    def _save_state(self, rows: dict[str, dict[str, Any]]) -> None:
        if self.state_path is not None:
            write_json(self.state_path, {"spec": self.spec, "rows": list(rows.values())})

    def _row(self, point: SearchPoint, score: float) -> dict[str, Any]:
        row = {"key": point.key, "register": point.register, "tau": point.tau, "delete_k": point.delete_k}
        row |= {"l_start": point.l_start, "mode": point.mode, "score": score}
        if point.register is not None:
            prov = self.caches[point.l_start].entry(point.register).provenance
            row["register_provenance"] = prov[0] if len(prov) == 1 else prov
        return row

    # ---- setup --------------------------------------------------------------------------------------
    def _start(self, point: SearchPoint) -> int:
        return min(point.l_start, self.l_q)

    @torch.no_grad()
    def _prepare(self, strategy: Strategy) -> None:
        """Float embeddings, the quantized copy calibrated on the plain model, cached streams."""
        if self._prepared_for == strategy:
            return
        with plain_float(self.encoder):
            self.float_embeddings = torch.cat([self._forward(self.encoder, x) for x in self.reference])
        if self.quantized is None:
            self.quantized = copy.deepcopy(self.encoder)
            quantize_(self.quantized, copy.deepcopy(self.config))
            self.recalibrator = Recalibrator(self.quantized)
        self._clear()
        self.recalibrator.recalibrate(self.calibration)  # plain model: fixes blocks < s for depth-causal methods
        self.plain_state = self.recalibrator.state()
        self.streams: dict[int, list[torch.Tensor]] = {}
        self.calibration_streams: dict[int, list[torch.Tensor]] = {}
        self.reference_chunks = self._chunks(self.reference)
        if self.compile_tail and self._compiled_block is None:
            # Block.input_filter is a plain attribute until a deletion module is first assigned, then
            # an entry of _modules: register it there on every block now, so the compiled block's
            # guards see one layout for every configuration (otherwise the first k̃ > 0 recompiles).
            for block in self.quantized.blocks:
                if "input_filter" not in block._modules:
                    current = block.input_filter
                    del block.input_filter
                    block.register_module("input_filter", current)
            # emulate_precision_casts: fused kernels still round where eager casts to bf16 (closer scores)
            self._compiled_block = torch.compile(_block_body, options={"emulate_precision_casts": True})
        if strategy == "cached":
            for s in sorted({self._start(p) for p in self.points}):
                self.streams[s] = self._chunks(self._streams(self.quantized, self.reference, s))
                tail = self.recalibrator.tail_input
                if tail is not None:
                    source = self.quantized if tail == "quantized" else self.encoder
                    with quant_mode(source, "quant" if tail == "quantized" else "float"):
                        self.calibration_streams[s] = self._streams(source, self.calibration, s)
        self._prepared_for = strategy

    def _streams(self, encoder: VisionEncoder, batches: list[torch.Tensor], s: int) -> list[torch.Tensor]:
        """The stream entering block s for every batch (blocks < s carry neither prefix nor deletion)."""
        out = []
        for x in batches:
            h = encoder.forward_blocks(encoder.embed(x.to(self.device, self.dtype)), 0, s)
            out.append(h.to(self.cache_device))
        return out

    def _chunks(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Re-split batches into near-equal chunks of at most ``eval_batch_size`` (order kept)."""
        if self.eval_batch_size is None or not batches:
            return batches
        whole = torch.cat(batches) if len(batches) > 1 else batches[0]
        n = whole.shape[0]
        size = math.ceil(n / math.ceil(n / self.eval_batch_size))
        return list(whole.split(size))

    def _clear(self) -> None:
        remove_prefix(self.quantized)
        remove_deletion(self.quantized)

    def install(self, point: SearchPoint, encoder: VisionEncoder | None = None) -> None:
        """Put configuration ``point`` (prefix + deletion) on ``encoder`` (default: the search's quantized copy)."""
        encoder = encoder if encoder is not None else self.quantized
        remove_prefix(encoder)
        remove_deletion(encoder)
        if point.register is not None and point.tau > 0:
            for layer, prefix in self._prefix(point, encoder):
                encoder.blocks[layer].attn.prefix = prefix
        install_deletion(encoder, self.l_q, point.delete_k, self.delete_mode, self.refill)

    def _prefix(self, point: SearchPoint, encoder: VisionEncoder) -> list[tuple[int, Any]]:
        """``(block, AttentionPrefix)`` of ``point``, built once per (l_start, register, τ, device, dtype)."""
        device, dtype = device_dtype(encoder)
        key = (point.l_start, point.register, point.tau, device, dtype)
        prefixes = self._prefixes.get(key)
        if prefixes is None:
            cache = self.caches[point.l_start].entry(point.register)
            layers = prefix_layers(cache, self.prefix_only_at)
            prefixes = self._prefixes[key] = [(i, cache.prefix(i, point.tau, device, dtype)) for i in layers]
        return prefixes

    # ---- evaluation --------------------------------------------------------------------------------
    def _forward(self, encoder: VisionEncoder, x: torch.Tensor) -> torch.Tensor:
        """The whole model on images ``x``, read out as the objective scores it (pooled embedding or patch tokens)."""
        return self.objective.readout(encoder, encoder.forward_blocks(encoder.embed(x.to(self.device, self.dtype))))

    def _score(self, embeddings: torch.Tensor) -> torch.Tensor | float:
        """The objective, left on the device where it can be (read later: no host sync here)."""
        return self.objective.score(embeddings, self.float_embeddings)

    @torch.no_grad()
    def _evaluate_full(self) -> torch.Tensor | float:
        q = self.quantized
        return self._score(torch.cat([self._forward(q, x) for x in self.reference_chunks]))

    def _tail(self, h: torch.Tensor, s: int) -> torch.Tensor:
        q = self.quantized
        return self.objective.readout(q, q.forward_blocks(h, s))

    def _run_tail_compiled(self, h: torch.Tensor, s: int) -> torch.Tensor:
        """The tail through the shared compiled block; input filters (deletions set the token count) run eagerly."""
        q = self.quantized
        keeping = []
        for block in q.blocks[s:]:
            if block.input_filter is not None:
                h = block.input_filter(h)
                if getattr(block.input_filter, "keeps_positions", False):
                    keeping.append(block.input_filter)
            torch._dynamo.maybe_mark_dynamic(h, 1)  # one graph for every k̃
            h = self._compiled_block(block, h)
        for filt in reversed(keeping):  # token-keeping deletion: the full grid again, as forward_blocks gives it
            h = filt.restore(h)
        return self.objective.readout(q, h)

    @torch.no_grad()
    def _evaluate_tail(self, s: int, compiled: bool = False) -> torch.Tensor | float:
        if compiled:
            try:
                score = self._tail_score(self._run_tail_compiled, s)
                self.stats["compiled_tail_runs"] += 1
                return score
            except Exception as exc:
                # compile_tail is a speed-up, on by default on GPUs: a tail it cannot compile runs eagerly
                # (a genuine error in the model then surfaces from the eager run below)
                log.warning("compile_tail: compiling the search's tail failed, running it eagerly: %r", exc)
                self._compiled_block = None
                self.stats["compile_fallback"] = repr(exc)
        return self._tail_score(self._tail, s)

    def _tail_score(self, run: Callable[[torch.Tensor, int], torch.Tensor], s: int) -> torch.Tensor | float:
        outs = [run(h.to(self.device, non_blocking=True), s) for h in self.streams[s]]
        return self._score(torch.cat(outs) if len(outs) > 1 else outs[0])

    def _recalibrate(self, point: SearchPoint, strategy: Strategy) -> bool:
        """Re-calibrate for ``point``; returns whether the cached reference streams are still valid."""
        if self.recalibrate_mode == "once":
            return True
        s = self._start(point)
        rc = self.recalibrator
        if strategy == "cached" and rc.tail_input is not None:
            if len(self.streams) > 1:  # blocks < s may hold another l_start's calibration
                rc.load(self.plain_state, 0, s)
            rc.recalibrate(self.calibration_streams[s], start=s, streams=True)
            return True
        rc.recalibrate(self.calibration)
        return strategy == "cached" and rc.head_unchanged(self.plain_state, s)

    def _run_point(self, point: SearchPoint, strategy: Strategy) -> torch.Tensor | float:
        self.install(point)
        streams_valid = self._recalibrate(point, strategy)
        if strategy == "cached" and streams_valid:
            self.stats["tail_runs"] += 1
            compiled = self._compiled_block is not None and point.mode in ("prefix", "both")
            return self._evaluate_tail(self._start(point), compiled)
        self.stats["full_runs"] += 1
        return self._evaluate_full()

    @torch.no_grad()
    def _run_batched(self, points: list[SearchPoint]) -> list[torch.Tensor | float]:
        """Many (register, τ) of one (k̃, l_start) at once: per-sample prefixes, shared quantizers."""
        first = points[0]
        s = self._start(first)
        q = self.quantized
        self.install(SearchPoint(None, 0, first.delete_k, first.l_start))
        caches = [self.caches[p.l_start].entry(p.register) for p in points]
        taus = [p.tau for p in points]
        outs: list[list[torch.Tensor]] = [[] for _ in points]
        for h in self.streams[s]:
            b = h.shape[0]
            install_batched_prefix(q, caches, taus, repeat=b, only=self.prefix_only_at)
            x = h.to(self.device).repeat(len(points), *([1] * (h.ndim - 1)))  # sample p*b + i = image i
            out = self.objective.readout(q, q.forward_blocks(x, s))
            emb = out.view(len(points), b, *out.shape[1:])
            for p in range(len(points)):
                outs[p].append(emb[p])
        self.stats["batched_runs"] += 1
        return [self._score(torch.cat(o)) for o in outs]

    def _groups(self, todo: list[SearchPoint], strategy: Strategy) -> list[list[SearchPoint]]:
        """Units of work: single points, or batches of (register, τ) points when quantizers are shared."""
        if not (strategy == "cached" and self.recalibrate_mode == "once"):
            return [[p] for p in todo]
        groups, pending = [], {}
        for p in todo:
            if p.register is None or p.tau == 0:
                groups.append([p])
            else:
                pending.setdefault((p.delete_k, p.l_start), []).append(p)
        for ps in pending.values():
            groups += [ps[i : i + self.configs_per_batch] for i in range(0, len(ps), self.configs_per_batch)]
        return groups

    # ---- driver ------------------------------------------------------------------------------------
    def run(
        self, strategy: Strategy = "cached", callback: Callable[[dict[str, Any]], None] | None = None
    ) -> SearchResult:
        """Evaluate every configuration not in the saved state; returns the ranked table.

        ``callback(row)`` runs after each configuration's row is recorded (progress reporting, early
        stop); rows reach the state file at most ``save_every_s`` later, and on any exception.
        """
        if strategy not in ("cached", "naive_loop"):
            raise ValueError(f"strategy must be 'cached' or 'naive_loop', got {strategy!r}")
        rows = self._load_state()
        todo = [p for p in self.points if p.key not in rows]
        self.stats = {
            "tail_runs": 0,
            "full_runs": 0,
            "batched_runs": 0,
            "compiled_tail_runs": 0,
            "resumed": len(self.points) - len(todo),
        }
        start = time.perf_counter()
        if todo:
            self._prepare(strategy)
            _synchronize(self.device)
        prepared = time.perf_counter()
        done_at: list[float] = []  # when each configuration's score was read (its work had finished)
        bar = tqdm(total=len(self.points), initial=len(rows), desc="register search", disable=not self.progress)
        pending: list[tuple[SearchPoint, torch.Tensor | float]] = []
        last_save, unsaved = time.monotonic(), False

        def record() -> None:  # read the queued scores (host sync), record their rows
            nonlocal last_save, unsaved
            while pending:
                point, score = pending.pop(0)
                rows[point.key] = self._row(point, float(score))
                done_at.append(time.perf_counter())
                unsaved = True
                bar.update(1)
                if callback is not None:
                    callback(rows[point.key])
            if unsaved and time.monotonic() - last_save >= self.save_every_s:
                self._save_state(rows)
                last_save, unsaved = time.monotonic(), False

        try:
            limit = 4 * len(self.l_starts) + 8 if self._compiled_block is not None else 0
            with _dynamo_limit(limit), fused_attention_as(self.fused_attention):
                for group in self._groups(todo, strategy):
                    first_compile = self._compiled_block is not None and not self.stats["compiled_tail_runs"]
                    began = time.perf_counter()
                    scores = self._run_batched(group) if len(group) > 1 else [self._run_point(group[0], strategy)]
                    if first_compile and self.stats["compiled_tail_runs"]:  # dynamo + Inductor ran in this call
                        self.stats["compile_s"] = round(time.perf_counter() - began, 3)
                    record()  # the previous group's scores: the device is already busy with this group
                    pending.extend(zip(group, scores, strict=True))
                record()
        finally:
            bar.close()
            self.stats.update(_grid_timings(start, prepared, done_at))
            if unsaved:
                self._save_state(rows)
            if self.quantized is not None:
                self._clear()
        ordered = [rows[p.key] for p in self.points]
        return SearchResult({**self.spec, "strategy": strategy}, ordered, self.objective.greater_is_better, self.stats)


def _synchronize(device: torch.device) -> None:
    """Wait for queued device work, so host clocks around it time the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _grid_timings(start: float, prepared: float, done_at: list[float]) -> dict[str, float]:
    """Where a run's time went: setup, the configurations, and the steady per-configuration cost.

    ``steady_s_per_config`` comes from the second half of the configurations (compilation, if any,
    happened in the first); it is what a longer grid adds per configuration.
    """
    out = {"prepare_s": round(prepared - start, 3)}
    if done_at:
        out["configurations_s"] = round(done_at[-1] - prepared, 3)
        half = len(done_at) // 2
        if len(done_at) - 1 - half > 0:
            out["steady_s_per_config"] = round((done_at[-1] - done_at[half]) / (len(done_at) - 1 - half), 6)
    return out


def _block_body(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One block after its input filter: compiled once, the graph is shared by every block (modules are inputs)."""
    return block.forward_unfiltered(x)


@contextmanager
def _dynamo_limit(n: int) -> Iterator[None]:
    """Raise dynamo's per-function recompile limit to at least ``n`` while the search runs (0: untouched)."""
    if not n:
        yield
        return
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    saved = getattr(config, name)
    setattr(config, name, max(saved, n))
    try:
        yield
    finally:
        setattr(config, name, saved)
