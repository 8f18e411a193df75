"""RegCache as a configuration over a base method: ``apply_regcache(encoder, RegCacheConfig(base_config=...), ...)``.

As torchao's ``SmoothQuantConfig(base_config)`` wraps another method, :class:`RegCacheConfig` wraps a
:class:`~regcache.quant.api.QuantConfig` with the register grid. :func:`apply_regcache` is the whole
pipeline in one process, plain PyTorch: sensitivity sweep → curation → register caches → grid search
→ install of the winner → the base method attached and calibrated with the registers in place::

    result = apply_regcache(encoder, RegCacheConfig(base_config=NaiveConfig(6, 6)), calib, reference, objective)
    result.point            # the winner (SearchPoint): result.point.install(other_float_encoder)

Its steps are public, so a distributed caller splits the grid across ranks between them
(``callbacks/register_search.py``: rank 0 prepares and broadcasts, every rank searches its share,
the rows are gathered)::

    prep = prepare_regcache(encoder, cfg, calib, reference, objective)   # sweep, curation, caches
    part = search_regcache(encoder, cfg, prep, calib, reference, objective, shard=(rank, world))
    point = choose(SearchResult(part.spec, gathered_rows, ...), cfg, prep)
    calibrate_regcache(encoder, point, cfg.base_config, calib)

``search_config`` (None: ``base_config``) is the method the sweep and the grid score with; only the
final calibration uses ``base_config``. An expensive method is then calibrated once, at the winner
of a cheaper one (per configuration the grid re-calibrates its method).
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from regcache.encoders.base import VisionEncoder
from regcache.quant.api import QuantConfig, calibrate_, quantize_
from regcache.quant.calibration import batch_images
from regcache.quant.state import quant_state
from regcache.registers._common import device_dtype
from regcache.registers.cache import DERIVATIONS, RegisterCache, derive_cache
from regcache.registers.curation import Candidates, curate_candidates
from regcache.registers.deletion import DELETE_MODES, REFILLS
from regcache.registers.objectives import OBJECTIVES, Objective, make_objective
from regcache.registers.search import (
    MODES,
    REGCACHE_MODES,
    SEARCH_DTYPES,
    RegisterSearch,
    SearchPoint,
    SearchResult,
    check_grid,
)
from regcache.registers.sweep import SweepResult, sensitivity_sweep

RECALIBRATE = ("per_config", "once")


def check_modes(modes: Sequence[str], delete_ks: Sequence[int]) -> None:
    """Raise a ValueError naming the field when ``modes`` is unknown or asks for configurations the grid lacks."""
    if isinstance(modes, str) or not modes or sorted(set(modes) - set(MODES)):
        raise ValueError(f"modes must be a non-empty list of {list(MODES)}, got {modes!r}")
    if {"delete", "both"} & set(modes) and not any(k > 0 for k in delete_ks):
        raise ValueError(f"modes {list(modes)} need a deletion: delete_ks must hold a k̃ > 0, got {list(delete_ks)}")


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None, optional: bool = False) -> None:
    if optional and value is None:
        return
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < minimum or (maximum is not None and value > maximum):
        bound = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be an integer {bound}{' or null' if optional else ''}, got {value!r}")


def check_settings(
    *,
    objective: str,
    l_q: int | None,
    sweep_bits: int,
    sweep_images: int,
    search_images: int,
    num_candidates: int,
    curation_layers_before: int,
    taus: Sequence[int] | None,
    delete_ks: Sequence[int] | None,
    l_start_offsets: Sequence[int] | None,
    modes: Sequence[str],
    derivation: str,
    prefix_only_at_lq: bool,
    recalibrate: str,
    eval_batch_size: int | None,
    compile_tail: bool | None,
    fused_attention: bool | None,
    search_dtype: str | None,
    save_every_s: float,
    delete_mode: str,
    refill: str,
) -> None:
    """Raise a ValueError naming the field and the valid values unless every RegCache setting is valid."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {objective!r}")
    _check_int("l_q", l_q, 0, optional=True)
    _check_int("sweep_bits", sweep_bits, 2, 8)
    for name, value in (("sweep_images", sweep_images), ("search_images", search_images)):
        _check_int(name, value, 1)
    _check_int("num_candidates", num_candidates, 1)
    _check_int("curation_layers_before", curation_layers_before, 0)
    _check_int("eval_batch_size", eval_batch_size, 1, optional=True)
    check_grid(taus=taus, delete_ks=delete_ks, l_start_offsets=l_start_offsets)  # null = default, [] = error
    check_modes(modes, delete_ks if delete_ks is not None else [0, 2, 4, 8])
    if derivation not in DERIVATIONS:
        raise ValueError(f"derivation must be one of {sorted(DERIVATIONS)}, got {derivation!r}")
    if recalibrate not in RECALIBRATE:
        raise ValueError(f"recalibrate must be one of {list(RECALIBRATE)}, got {recalibrate!r}")
    if not isinstance(prefix_only_at_lq, bool):
        raise ValueError(f"prefix_only_at_lq must be true or false, got {prefix_only_at_lq!r}")
    for name, value in (("compile_tail", compile_tail), ("fused_attention", fused_attention)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be true, false or null, got {value!r}")
    if search_dtype is not None and search_dtype not in SEARCH_DTYPES:
        raise ValueError(f"search_dtype must be one of {sorted(SEARCH_DTYPES)} or null, got {search_dtype!r}")
    if isinstance(save_every_s, bool) or not isinstance(save_every_s, numbers.Real) or save_every_s < 0:
        raise ValueError(f"save_every_s must be a number of seconds >= 0, got {save_every_s!r}")
    if delete_mode not in DELETE_MODES:
        raise ValueError(f"delete_mode must be one of {list(DELETE_MODES)}, got {delete_mode!r}")
    if refill not in REFILLS:
        raise ValueError(f"refill must be one of {list(REFILLS)} (used by delete_mode keep), got {refill!r}")


@dataclass
class RegCacheConfig:
    """RegCache over a base method: the grid, the objective and how the search runs.

    Args:
        base_config: the method calibrated at the end, with the winner installed.
        search_config: the method the sweep and the grid score with (None: ``base_config``): find the
            winner with a cheaper method, calibrate ``base_config`` once at it.
        objective: the objective's name (``acc_ref``, ``cosine``, ``mse``, ``patch_cosine``); the
            objective given to :func:`apply_regcache` must be of this name (label-free ones are built here).
        l_q: the sensitive block; None runs the sensitivity sweep.
        sweep_bits: bits of the sweep's one-block quantization (paper: W8A8).
        sweep_images: reference images the sweep scores on (whole reference batches, at least one).
        search_images: reference images each configuration is scored on (the first ones given).
        num_candidates: k of the streaming top-k curation (v1: 20).
        curation_layers_before: also curate up to this many blocks before l_q (v4 option: 3).
        taus, delete_ks: the grid (τ ≥ 1: prefix multiplicity; k̃ ≥ 0: tokens deleted at l_q).
        l_start_offsets: one register cache per l_start = max(0, l_q - offset).
        modes: which configurations are searched and the winner is the best of (``prefix``, ``delete``,
            ``both``, ``base``); the base is always scored, to compare with.
        derivation: ``propagate`` or ``in_context`` (:data:`~regcache.registers.cache.DERIVATIONS`).
        prefix_only_at_lq: the prefix in block l_q only (DINOv2, paper v4).
        recalibrate: ``per_config`` (exact) or ``once`` (batched approximation).
        eval_batch_size: reference images per search forward (None: as given).
        compile_tail: ``torch.compile`` the search's tail (None: on for an encoder on a GPU).
        fused_attention: the grid's quantized attention as one Triton kernel (None: the process setting).
        search_dtype: ``float32`` / ``bfloat16`` / ``float16`` for the grid (None: the encoder's dtype).
        save_every_s: at most this long between writes of the resumable search state.
        delete_mode, refill: how k̃ > 0 deletes (:class:`~regcache.registers.deletion.TokenDeletion`).
    """

    base_config: QuantConfig
    search_config: QuantConfig | None = None
    objective: str = "acc_ref"
    l_q: int | None = None
    sweep_bits: int = 8
    sweep_images: int = 256
    search_images: int = 1000
    num_candidates: int = 20
    curation_layers_before: int = 0
    taus: list[int] = field(default_factory=lambda: list(range(1, 16)))
    delete_ks: list[int] = field(default_factory=lambda: [0, 2, 4, 8])
    l_start_offsets: list[int] = field(default_factory=lambda: [0])
    modes: list[str] = field(default_factory=lambda: list(REGCACHE_MODES))
    derivation: str = "propagate"
    prefix_only_at_lq: bool = False
    recalibrate: str = "per_config"
    eval_batch_size: int | None = None
    compile_tail: bool | None = None
    fused_attention: bool | None = None
    search_dtype: str | None = None
    save_every_s: float = 10.0
    delete_mode: str = "drop"
    refill: str = "input"

    def __post_init__(self) -> None:
        for name in ("base_config", "search_config"):
            value = getattr(self, name)
            if not isinstance(value, QuantConfig) and not (value is None and name == "search_config"):
                hint = "e.g. NaiveConfig(w_bits=6, a_bits=6) or method_config('repq_vit', 6, 6)"
                raise TypeError(f"{name} must be a QuantConfig ({hint}), got {type(value).__name__}")
        for name in ("taus", "delete_ks", "l_start_offsets", "modes"):  # tuples and ranges welcome
            value = getattr(self, name)
            if not isinstance(value, (str, bytes)) and isinstance(value, Iterable):
                setattr(self, name, list(value))
        check_settings(**self.settings())

    def settings(self) -> dict[str, Any]:
        """Every field but the two method configs (what the grid and its scores depend on beside them)."""
        skip = ("base_config", "search_config")
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}

    @property
    def scoring_config(self) -> QuantConfig:
        """The method the sweep and the grid score with: ``search_config``, else ``base_config``."""
        return self.search_config if self.search_config is not None else self.base_config


@dataclass
class RegCachePrep:
    """What the grid search needs, computed once: l_q (given or swept), the candidates and a cache per l_start."""

    l_q: int
    caches: dict[int, RegisterCache]
    sweep: SweepResult | None = None
    candidates: Candidates | None = None

    def to(self, device: torch.device | str) -> RegCachePrep:
        """The same with the caches on ``device`` (the host before a broadcast: GPU tensors would unpickle
        onto the sender's device)."""
        return dataclasses.replace(self, caches={s: c.to(device) for s, c in self.caches.items()})


@dataclass
class RegCacheResult:
    """What :func:`apply_regcache` computed and installed."""

    config: RegCacheConfig
    prep: RegCachePrep
    search: SearchResult
    point: SearchPoint
    encoder: VisionEncoder
    calibrated: bool

    @property
    def sweep(self) -> SweepResult | None:
        """The sensitivity sweep (None where ``l_q`` was given)."""
        return self.prep.sweep

    @property
    def candidates(self) -> Candidates | None:
        """The curated register candidates."""
        return self.prep.candidates

    @property
    def caches(self) -> dict[int, RegisterCache]:
        """``{l_start: RegisterCache}``."""
        return self.prep.caches

    @property
    def l_q(self) -> int:
        """The sensitive block."""
        return self.prep.l_q

    def point_of(self, modes: Iterable[str]) -> SearchPoint:
        """The best configuration of ``modes`` (an ablation's winner), ready to install."""
        return choose(self.search, self.config, self.prep, modes)

    def summary(self) -> dict[str, Any]:
        """The installed configuration and its comparison with the base (metrics.json's ``regcache`` fields)."""
        return regcache_summary(self.search, self.point, self.config)

    def quant_state(self) -> Any:
        """The installed encoder's calibrated quantization state (:func:`regcache.quant.state.quant_state`)."""
        return quant_state(self.encoder)


def _images(batches: Iterable[Any]) -> list[torch.Tensor]:
    return [batch_images(b) for b in batches]


def _head_objective(objective: Objective, n: int) -> Objective:
    """The objective for the first ``n`` reference images (labelled objectives keep their first ``n`` labels)."""
    labels = getattr(objective, "labels", None)
    if dataclasses.is_dataclass(objective) and isinstance(labels, torch.Tensor) and labels.shape[0] > n:
        return dataclasses.replace(objective, labels=labels[:n])
    return objective


def _limit(batches: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """The first ``n`` images of ``batches``, batches kept (the last one cut)."""
    out, seen = [], 0
    for x in batches:
        if seen >= n:
            break
        out.append(x[: n - seen])
        seen += out[-1].shape[0]
    return out


def resolve_objective(cfg: RegCacheConfig, objective: Objective | None) -> Objective:
    """The objective given (checked against ``cfg.objective``), or the label-free one ``cfg.objective`` names."""
    if objective is None:
        if cfg.objective in ("acc_ref", "predictions"):
            raise ValueError(
                f"objective {cfg.objective!r} needs labels: pass objective=make_objective({cfg.objective!r}, "
                "labels=..., ...) or choose a label-free one (cosine, mse, patch_cosine)"
            )
        return make_objective(cfg.objective)
    if objective.name != cfg.objective:
        raise ValueError(
            f"the objective passed is {objective.name!r} but RegCacheConfig.objective is {cfg.objective!r}: "
            "make them agree"
        )
    return objective


def prepare_regcache(
    encoder: VisionEncoder,
    cfg: RegCacheConfig,
    calibration: Iterable[Any],
    reference: Iterable[Any],
    objective: Objective | None = None,
    *,
    out: str | Path | None = None,
    progress: bool = True,
) -> RegCachePrep:
    """Sweep (unless ``cfg.l_q``), curation on the reference images and one register cache per l_start.

    ``out``: also write the sweep (``sensitivity.json`` / ``.png``), ``candidates.safetensors`` and
    ``cache_lstart<s>.safetensors`` there.
    """
    objective = resolve_objective(cfg, objective)
    reference = _limit(_images(reference), cfg.search_images)
    if not reference:
        raise ValueError("the reference set is empty: RegCache needs reference images")
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
    l_q, sweep = cfg.l_q, None
    if l_q is None:
        sweep_config = dataclasses.replace(cfg.scoring_config, w_bits=cfg.sweep_bits, a_bits=cfg.sweep_bits)
        subset = reference[: max(1, cfg.sweep_images // max(1, reference[0].shape[0]))]  # whole batches
        head = _head_objective(objective, sum(x.shape[0] for x in subset))
        sweep = sensitivity_sweep(encoder, sweep_config, calibration, subset, head, progress=progress)
        if out is not None:
            sweep.save(out)
        l_q = sweep.l_q
    if l_q >= encoder.num_blocks:
        raise ValueError(f"l_q must be a block of the encoder (0..{encoder.num_blocks - 1}), got {l_q}")
    layers = list(range(max(0, l_q - cfg.curation_layers_before), l_q + 1))
    candidates = curate_candidates(encoder, reference, layers, k=cfg.num_candidates, progress=progress)
    caches = {}
    for offset in cfg.l_start_offsets:
        l_start = max(0, l_q - offset)
        caches[l_start] = derive_cache(encoder, candidates, l_start, cfg.derivation)
    if out is not None:
        candidates.save(out / "candidates.safetensors")
        for l_start, cache in caches.items():
            cache.save(out / f"cache_lstart{l_start}.safetensors")
    return RegCachePrep(l_q, caches, sweep, candidates)


def search_regcache(
    encoder: VisionEncoder,
    cfg: RegCacheConfig,
    prep: RegCachePrep,
    calibration: Iterable[Any],
    reference: Iterable[Any],
    objective: Objective | None = None,
    *,
    shard: tuple[int, int] = (0, 1),
    state_path: str | Path | None = None,
    progress: bool = True,
) -> SearchResult:
    """The grid of ``cfg`` scored with ``cfg.scoring_config``; ``shard=(rank, world)`` scores configurations
    rank, rank + world, ... only (gather every rank's rows for the whole table)."""
    rank, world = shard
    if not (isinstance(rank, int) and isinstance(world, int) and 0 <= rank < world):
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    objective = resolve_objective(cfg, objective)
    reference = _limit(_images(reference), cfg.search_images)
    objective = _head_objective(objective, sum(x.shape[0] for x in reference))
    compile_tail = cfg.compile_tail if cfg.compile_tail is not None else device_dtype(encoder)[0].type == "cuda"
    search = RegisterSearch(
        encoder,
        cfg.scoring_config,
        calibration,
        reference,
        objective,
        prep.l_q,
        caches=prep.caches,
        taus=cfg.taus,
        delete_ks=cfg.delete_ks,
        l_starts=sorted(prep.caches),
        modes=cfg.modes,
        prefix_only_at=prep.l_q if cfg.prefix_only_at_lq else None,
        recalibrate=cfg.recalibrate,
        eval_batch_size=cfg.eval_batch_size,
        compile_tail=compile_tail,
        fused_attention=cfg.fused_attention,
        dtype=SEARCH_DTYPES.get(cfg.search_dtype),
        delete_mode=cfg.delete_mode,
        refill=cfg.refill,
        save_every_s=cfg.save_every_s,
        state_path=state_path,
        progress=progress,
    )
    search.points = search.points[rank::world]
    return search.run()


def choose(
    result: SearchResult, cfg: RegCacheConfig, prep: RegCachePrep, modes: Iterable[str] | None = None
) -> SearchPoint:
    """The best configuration of ``modes`` (default ``cfg.modes``) as a point that installs itself."""
    row = result.best_of(cfg.modes if modes is None else modes)
    point = SearchPoint.from_dict(row)
    cache = prep.caches[point.l_start].entry(point.register) if point.register is not None else None
    return dataclasses.replace(
        point,
        l_q=prep.l_q,
        prefix_only_at=prep.l_q if cfg.prefix_only_at_lq else None,
        delete_mode=cfg.delete_mode,
        refill=cfg.refill,
        score=row["score"],
        cache=cache,
    )


def calibrate_regcache(
    encoder: VisionEncoder, point: SearchPoint, config: QuantConfig, calibration: Iterable[Any], progress: bool = True
) -> VisionEncoder:
    """Install ``point`` on the float ``encoder``, attach ``config`` (a copy), calibrate with the registers in place."""
    point.install(encoder)
    quantize_(encoder, copy.deepcopy(config))
    return calibrate_(encoder, calibration, progress=progress)


def compare_with_base(result: SearchResult, installed: dict[str, Any], modes: list[str]) -> tuple[dict[str, Any], str]:
    """The installed configuration (a table row or ``SearchPoint.to_dict()``) against the base on the
    reference (metrics.json fields), and the log line.

    The fields hold ``warning`` where the run installs the base or a configuration that scores no better.
    """
    base = result.best_of(["base"])
    gain = result.gain(installed, base)
    out: dict[str, Any] = {
        "base_score": base["score"],
        "gain_over_base": gain,
        "best_by_mode": {m: {"key": r["key"], "score": r["score"]} for m, r in result.best_by_mode().items()},
    }
    scores = f"{installed['score']:.4g} against the base's {base['score']:.4g} on the reference"
    if installed["mode"] == "base":
        out["warning"] = (
            f"RegCache result is the base: no configuration of modes {modes} scored above the method without "
            f"RegCache ({scores}); nothing is installed and the numbers are the base method's"
        )
    elif gain <= 0:
        out["warning"] = (
            f"the installed {installed['mode']} configuration {installed['key']} (modes {modes}) scores no better "
            f"than the method without RegCache ({scores})"
        )
    message = out.get("warning", f"installed the best {installed['mode']} configuration {installed['key']} ({scores})")
    return out, message


def regcache_summary(result: SearchResult, point: SearchPoint, cfg: RegCacheConfig) -> dict[str, Any]:
    """metrics.json's ``regcache`` fields of an installed point: where and what, its score, the base's."""
    comparison, _ = compare_with_base(result, point.to_dict(), list(cfg.modes))
    return {
        "l_q": point.l_q,
        "l_start": point.l_start,
        "tau": point.tau,
        "k_delete": point.delete_k,
        "register": point.register,
        "mode": point.mode,
        "modes": list(cfg.modes),
        "objective": cfg.objective,
        "objective_score": point.score,
        **comparison,
    }


def apply_regcache(
    encoder: VisionEncoder,
    cfg: RegCacheConfig,
    calibration: Iterable[Any],
    reference: Iterable[Any],
    objective: Objective | None = None,
    *,
    calibrate: bool = True,
    state_path: str | Path | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> RegCacheResult:
    """RegCache on the float ``encoder`` in place: sweep → curation → caches → search → install → calibrate.

    ``calibration`` / ``reference``: re-iterable image batches (tensors, tuples or dicts); ``objective``
    scores the reference images in order (None: the label-free objective ``cfg.objective`` names).
    The search scores with ``cfg.scoring_config``; the winner (``cfg.modes``' best) is installed and
    ``cfg.base_config`` attached and calibrated (``calibrate=False``: the encoder stays float and
    untouched). ``state_path``: the search's resumable state; ``out``: where the sweep, candidates
    and caches are written.
    """
    objective = resolve_objective(cfg, objective)
    calibration = _images(calibration)
    reference = _images(reference)
    prep = prepare_regcache(encoder, cfg, calibration, reference, objective, out=out, progress=progress)
    result = search_regcache(
        encoder, cfg, prep, calibration, reference, objective, state_path=state_path, progress=progress
    )
    point = choose(result, cfg, prep)
    if calibrate:
        calibrate_regcache(encoder, point, cfg.base_config, calibration, progress=progress)
    return RegCacheResult(cfg, prep, result, point, encoder, calibrate)
