"""RegCache before calibration: sensitivity sweep → curation → register cache → grid search → install.

Multi-GPU: the sweep, the curation and the register caches are computed on rank 0 and broadcast
(they are cheap next to the search, and one source rules out rank disagreement); the grid
search's configurations are split across ranks (rank r takes configurations r, r+W, ...), each
rank saving its own resumable state, and the rows are gathered so every rank picks the same
winner. The search (sweep, candidates, register caches, resumable states, table and winner) is an artifact
keyed by everything it depends on (:meth:`RegisterSearch.spec`: model and weights fingerprint,
method config and bits, grid settings, calibration and reference selections) in
``<artifacts_dir>/register_search/<key>/``, reused only by a run of the same key (or, since the table
holds every mode it searched, by one that differs only in ``modes`` and asks for modes it holds)
unless ``force``.

What is installed is the best configuration *of the run's modes* (``modes``): an ablation with
``modes: [prefix]`` installs the best prefix-only configuration even where it scores below the
base method. The base (no prefix, no deletion) is always scored, as the reference the run is
compared with (``base_score``, ``gain_over_base`` in metrics.json, and one log line); it is
installed only where ``modes`` lists ``base``, and a run that installs it, or whose configuration
scores no better than it, says so in a warning and in metrics.json (``warning``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from regcache._lightning import pl
from regcache.artifacts import Artifact, canonical
from regcache.eval import build_zeroshot_classifier
from regcache.quant import method_config
from regcache.quant.calibration import batch_images
from regcache.registers import (
    RegCacheConfig,
    RegCachePrep,
    RegisterCache,
    SearchResult,
    choose,
    compare_with_base,
    make_objective,
    prepare_regcache,
    regcache_summary,
    search_regcache,
)
from regcache.registers.pipeline import check_modes, check_settings
from regcache.registers.search import REGCACHE_MODES
from regcache.utils import write_json

log = logging.getLogger(__name__)

RESULT_FILE = "search_result.json"


def _gather_rows(
    rows: list[dict[str, Any]], stats: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every rank's rows, and every rank's search stats (rank order): the table and where each rank's time went."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows, [stats]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (rows, stats))
    return [r for part, _ in gathered for r in part], [s for _, s in gathered]


class RegisterSearch(pl.Callback):
    """Find and install the RegCache configuration for the module's base method.

    Args:
        objective: ``acc_ref`` (zero-shot top-1 on the reference split; needs a text tower),
            ``cosine`` or ``mse`` (label-free, to the float model's final embedding), ``patch_cosine``
            (label-free, mean per-token cosine of the patch tokens to the float model's: VLM features;
            the kept tokens under ``delete_mode: drop``, the whole grid under ``keep``).
        l_q: sensitive block; None runs the sensitivity sweep.
        sweep_bits: bits of the sweep's one-block quantization (paper: W8A8).
        sweep_images: reference images used by the sweep.
        search_images: reference images scored per configuration.
        num_candidates: k of the streaming top-k curation (v1: 20).
        curation_layers_before: also curate up to this many blocks before l_q (v4 option: 3).
        taus, delete_ks: the grid (paper: τ ∈ 1..15, k̃ ∈ a small set).
        l_start_offsets: l_start = l_q - offset for each offset (0 = prefix from l_q on).
        modes: which configurations the run searches and installs the best of: ``prefix`` (a
            register prefix, no deletion), ``delete`` (deletion only), ``both`` (prefix and
            deletion with k̃ > 0), ``base`` (neither). Default ``[prefix, both]``: RegCache with k̃
            tuned over ``delete_ks``, 0 included. One mode is that ablation: ``[prefix]`` installs
            the best prefix-only configuration, whatever the base scores. The base is scored
            in every run, to compare with.
        derivation: ``propagate`` (default) or ``in_context``.
        prefix_only_at_lq: install the prefix only in block l_q (DINOv2, paper v4).
        recalibrate: ``per_config`` (exact, default) or ``once`` (batched approximation).
        eval_batch_size: reference images per search forward (None: the reference loader's batches;
            the whole reference set at once is fastest where memory allows).
        compile_tail: ``torch.compile`` the search's tail forward (one compilation for the grid;
            scores agree with eager to float tolerance, not bit for bit). None: on where the model
            is on a GPU (faster per configuration, compile included: BENCHMARKS.md §1), off on CPU, where
            compiling costs more than it saves.
        fused_attention: run the quantized attention as one Triton kernel during the grid (None: the
            process setting, on by default where the kernel applies, CUDA; scores to float tolerance).
        search_dtype: the dtype the grid runs in (``float32``, ``bfloat16``, ``float16``; None: the
            model's). ``bfloat16`` runs the grid on a bf16 copy of the float model: on GPUs several
            times faster than float32 (BENCHMARKS.md §5), with scores carrying bf16 rounding.
        save_every_s: at most this many seconds between writes of the resumable search state
            (what a preemption can lose; 0 writes after every configuration).
        force: recompute even if a saved result exists.
        delete_mode: ``drop`` (default: the paper's deletion, a shorter sequence, for classification /
            retrieval) or ``keep`` (the deleted tokens are out of every later block and quantizer statistic,
            and come back at their positions after the last block: the full token grid, for VLM / dense use).
        refill: what a deleted position holds in ``keep`` mode: ``input`` (the token's own state at l_q)
            or ``mean`` (the mean kept patch token); see ``regcache.registers.deletion.TokenDeletion``.
        search_method: the method the sweep and the grid score with (None: the module's method), at the
            module's bits with ``search_method_options``; the module's method is then calibrated once, at
            the winner (``RegCacheConfig.search_config``: an expensive method searched with a cheaper one).
        search_method_options: that method's options (its dataclass fields, checked).
        enabled: false runs the method without RegCache (nothing is searched or installed,
            ``regcache`` is null in metrics.json): the switch that turns a RegCache config into
            its baseline, ``--trainer.callbacks.init_args.enabled=false``.
    """

    def __init__(
        self,
        objective: str = "acc_ref",
        l_q: int | None = None,
        sweep_bits: int = 8,
        sweep_images: int = 256,
        search_images: int = 1000,
        num_candidates: int = 20,
        curation_layers_before: int = 0,
        taus: list[int] | None = None,
        delete_ks: list[int] | None = None,
        l_start_offsets: list[int] | None = None,
        modes: list[str] | None = None,
        derivation: str = "propagate",
        prefix_only_at_lq: bool = False,
        recalibrate: str = "per_config",
        eval_batch_size: int | None = None,
        compile_tail: bool | None = None,
        fused_attention: bool | None = None,
        search_dtype: str | None = None,
        save_every_s: float = 10.0,
        force: bool = False,
        enabled: bool = True,
        delete_mode: str = "drop",
        refill: str = "input",
        search_method: str | None = None,
        search_method_options: dict[str, Any] | None = None,
    ) -> None:
        modes = list(modes) if modes is not None else list(REGCACHE_MODES)
        # RegCacheConfig's checks, before any model work: an error names the field and the valid values
        check_settings(
            objective=objective,
            l_q=l_q,
            sweep_bits=sweep_bits,
            sweep_images=sweep_images,
            search_images=search_images,
            num_candidates=num_candidates,
            curation_layers_before=curation_layers_before,
            taus=taus,
            delete_ks=delete_ks,
            l_start_offsets=l_start_offsets,
            modes=modes,
            derivation=derivation,
            prefix_only_at_lq=prefix_only_at_lq,
            recalibrate=recalibrate,
            eval_batch_size=eval_batch_size,
            compile_tail=compile_tail,
            fused_attention=fused_attention,
            search_dtype=search_dtype,
            save_every_s=save_every_s,
            delete_mode=delete_mode,
            refill=refill,
        )
        if search_method is not None:  # an unknown name or option key is an error listing the valid ones
            method_config(search_method, options=search_method_options)
        elif search_method_options:
            raise ValueError("search_method_options is set but search_method is not: name the search method")
        self.search_method, self.search_method_options = search_method, dict(search_method_options or {})
        self.objective_name = objective
        self.l_q = l_q
        self.sweep_bits = sweep_bits
        self.sweep_images = sweep_images
        self.search_images = search_images
        self.num_candidates = num_candidates
        self.curation_layers_before = curation_layers_before
        self.taus = taus or list(range(1, 16))
        self.delete_ks = delete_ks if delete_ks is not None else [0, 2, 4, 8]
        self.l_start_offsets = l_start_offsets or [0]
        self.modes = modes
        self.derivation = derivation
        self.prefix_only_at_lq = prefix_only_at_lq
        self.recalibrate = recalibrate
        self.eval_batch_size = eval_batch_size
        self.compile_tail = compile_tail
        self.fused_attention = fused_attention
        self.search_dtype = search_dtype
        self.save_every_s = save_every_s
        self.force = force
        self.enabled = enabled
        self.delete_mode, self.refill = delete_mode, refill
        self.done = False

    def settings(self) -> dict[str, Any]:
        """What defines the grid and its scores (part of the search's artifact key)."""
        fields = ("objective_name", "l_q", "sweep_bits", "sweep_images", "search_images", "num_candidates")
        fields += ("curation_layers_before", "taus", "delete_ks", "l_start_offsets", "modes", "derivation")
        fields += ("prefix_only_at_lq", "recalibrate", "search_dtype")
        if self.delete_mode != "drop":  # the default leaves the keys of drop runs as they were
            fields += ("delete_mode", "refill")
        if self.search_method is not None:  # likewise for runs that search with their own method
            fields += ("search_method", "search_method_options")
        return canonical({name: getattr(self, name) for name in fields})

    def regcache_config(self, pl_module: pl.LightningModule) -> RegCacheConfig:
        """This callback's settings over the module's method (``compile_tail`` None: on for a model on a GPU)."""
        names = ("l_q", "sweep_bits", "sweep_images", "search_images", "num_candidates", "curation_layers_before")
        names += ("taus", "delete_ks", "l_start_offsets", "modes", "derivation", "prefix_only_at_lq", "recalibrate")
        names += ("eval_batch_size", "fused_attention", "search_dtype", "save_every_s", "delete_mode", "refill")
        base = pl_module.quant_config
        search = None
        if self.search_method is not None:
            search = method_config(self.search_method, base.w_bits, base.a_bits, self.search_method_options)
        return RegCacheConfig(
            base_config=base,
            search_config=search,
            objective=self.objective_name,
            compile_tail=self._compile_tail(pl_module),
            **{name: getattr(self, name) for name in names},
        )

    def spec(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """Everything the search's result depends on: model and weights, method and bits, grid, data selection."""
        datamodule = trainer.datamodule
        return {
            "model": pl_module.model_spec(),
            "method": pl_module.quant_config.to_dict(),
            "search": self.settings(),
            "calibration": datamodule.calib_selection(),
            "reference": datamodule.reference_selection(),
        }

    def _artifact(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Artifact:
        """This run's search artifact: the exact key's, else a finished search that differs only in
        ``modes`` and whose table holds the run's modes (rank 0 decides, every rank follows)."""
        store = pl_module.artifacts
        spec = self.spec(trainer, pl_module)
        artifact = store.open("register_search", spec, complete=RESULT_FILE, force=self.force)
        if not artifact.reused and not self.force:

            def answers(stored: dict[str, Any]) -> bool:
                other = {**stored, "search": {k: v for k, v in stored["search"].items() if k != "modes"}}
                mine = {**artifact.spec, "search": {k: v for k, v in artifact.spec["search"].items() if k != "modes"}}
                # the base is scored in every search
                return other == mine and set(self.modes) <= {"base", *stored["search"]["modes"]}

            for found in store.candidates("register_search", RESULT_FILE, answers):
                store.forget(artifact)
                artifact = store.adopt(found)
                break
        choice = trainer.strategy.broadcast((artifact.key, str(artifact.dir), artifact.reused), src=0)
        if choice != (artifact.key, str(artifact.dir), artifact.reused):  # another rank saw other files
            store.forget(artifact)
            artifact = Artifact("register_search", choice[0], artifact.spec, Path(choice[1]), choice[2])
            store.used[f"register_search/{artifact.key}"] = artifact
        return artifact

    # ------------------------------------------------------------------ data
    def _reference(self, trainer, pl_module, limit: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        images, labels, seen = [], [], 0
        for batch in trainer.datamodule.reference_dataloader(split_by_rank=False):
            x = batch_images(batch).to(pl_module.device)
            images.append(x[: limit - seen])
            if isinstance(batch, dict) and "label" in batch:
                labels.append(batch["label"][: limit - seen].to(pl_module.device))
            seen += images[-1].shape[0]
            if seen >= limit:
                break
        if not images:
            raise RuntimeError("the reference split is empty: the register search needs reference images")
        return images, torch.cat(labels) if labels else None

    def _objective(self, trainer, pl_module, labels: torch.Tensor | None):
        """The search objective on the reference images (the pipeline cuts its labels for the sweep's subset)."""
        if self.objective_name != "acc_ref":
            return make_objective(self.objective_name)
        if not pl_module.has_text_tower or labels is None:
            raise ValueError(
                "objective acc_ref needs a text tower and a labelled reference split; use cosine, mse or patch_cosine"
            )
        classnames, templates = trainer.datamodule.reference_info()
        with torch.inference_mode(False), torch.no_grad():
            classifier = build_zeroshot_classifier(
                pl_module.net,
                pl_module.tokenizer,
                classnames,
                templates,
                device=pl_module.device,
                cache_dir=str(pl_module.run_dir / "cache"),
                model_id=pl_module.loaded.identity,
                progress=trainer.progress_bar_callback is not None,
            )
        return make_objective("acc_ref", labels=labels, classifier=classifier)

    def _compile_tail(self, pl_module: pl.LightningModule) -> bool:
        """compile_tail as given, or (None) whether the model is on a GPU."""
        return self.compile_tail if self.compile_tail is not None else pl_module.device.type == "cuda"

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Search (or reuse a saved search of) the grid across ranks and install the best of the run's modes."""
        if self.done or pl_module.quant_config is None:
            return
        if not self.enabled:
            if trainer.is_global_zero:
                log.warning("RegisterSearch: enabled is false, the method runs without RegCache")
            self.done = True
            return
        settings = self.settings()
        cfg = self.regcache_config(pl_module)
        encoder = pl_module.encoder
        progress = trainer.progress_bar_callback is not None
        start = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():
            artifact = self._artifact(trainer, pl_module)
            out = artifact.dir
            result_path = artifact.path(RESULT_FILE)
            with pl_module.timed("register_search.reference"):
                reference, labels = self._reference(trainer, pl_module, self.search_images)
            with pl_module.timed("register_search.objective"):
                objective = self._objective(trainer, pl_module, labels)
            steady = None  # this rank's steady seconds per configuration (None: the grid did not run here)
            if artifact.reused:  # a finished search of this key (or of a superset of the run's modes)
                data = json.loads(result_path.read_text())
                result = SearchResult.from_dict(data, objective.greater_is_better)
                l_start, seconds = result.best_of(self.modes)["l_start"], data.get("search_seconds")
                cache = RegisterCache.load(out / f"cache_lstart{l_start}.safetensors", encoder)
                point = choose(result, cfg, RegCachePrep(data["spec"]["l_q"], {l_start: cache}))
            else:
                with pl_module.timed("register_search.calibration_images"):
                    calibration = list(trainer.datamodule.calib_dataloader())
                with pl_module.timed("register_search.rank0_artifacts"):  # sweep, curation, caches
                    prep = None
                    if trainer.is_global_zero:
                        prep = prepare_regcache(
                            encoder, cfg, calibration, reference, objective, out=out, progress=progress
                        ).to("cpu")  # on the host for the broadcast (see RegCachePrep.to)
                    prep = trainer.strategy.broadcast(prep, src=0).to(pl_module.device)
                rank, world = trainer.global_rank, trainer.world_size
                grid_start = time.perf_counter()
                try:
                    partial = search_regcache(
                        encoder,
                        cfg,
                        prep,
                        calibration,
                        reference,
                        objective,
                        shard=(rank, world),  # every rank searches its share of the grid
                        # in the artifact's folder: a run of another key does not meet this one's rows
                        state_path=out / f"search_state.rank{rank}of{world}.json",
                        progress=progress and trainer.is_global_zero,  # rank 0 alone draws the bar
                    )
                finally:  # one clock: rank 0's timings_s and this rank's stats (gathered below)
                    grid_s = time.perf_counter() - grid_start
                    pl_module.add_time("register_search.grid", grid_s)
                partial.stats["grid_s"] = round(grid_s, 3)
                for part in ("prepare", "compile", "configurations"):  # where this rank's grid time went
                    if f"{part}_s" in partial.stats:
                        pl_module.add_time(f"register_search.grid.{part}", partial.stats[f"{part}_s"])
                steady = partial.stats.get("steady_s_per_config")
                with pl_module.timed("register_search.gather"):  # this rank waiting for the slowest one
                    rows, rank_stats = _gather_rows(partial.rows, partial.stats)
                # the slowest rank sets the search's wall clock: its grid time, beside rank 0's
                pl_module.add_time("register_search.grid.slowest_rank", max(st["grid_s"] for st in rank_stats))
                stats = {**partial.stats, "ranks": rank_stats}  # rank 0's, then every rank's
                result = SearchResult(partial.spec, rows, objective.greater_is_better, stats)
                point = choose(result, cfg, prep)
                seconds = time.perf_counter() - start
                if trainer.is_global_zero:
                    saved = {**result.to_dict(), "installed": point.to_dict(), "settings": settings}
                    saved["key"] = artifact.key
                    sweep = None if prep.sweep is None else prep.sweep.table()
                    write_json(result_path, {**saved, "search_seconds": seconds, "sweep": sweep})
                    artifact.commit()
        point.install(encoder)
        pl_module.regcache_point = point  # the typed winner, for the calibration's key
        pl_module.add_time("register_search", time.perf_counter() - start)
        summary = regcache_summary(result, point, cfg)
        _, message = compare_with_base(result, point.to_dict(), self.modes)
        if trainer.is_global_zero:
            if "warning" in summary:
                log.warning("RegisterSearch: %s", message)
            else:
                pl.utilities.rank_zero_info(f"RegisterSearch: {message}")
        pl_module.results["regcache"] = {
            **summary,
            "search_seconds": seconds,
            "steady_ms_per_config": None if steady is None else round(1e3 * steady, 2),
            "result": str(result_path),
            "search_key": artifact.key,
            "reused": artifact.reused,
            "prefix_only_at_lq": self.prefix_only_at_lq,
            "delete_mode": self.delete_mode,
            **({} if self.search_method is None else {"search_method": cfg.scoring_config.to_dict()}),
        }
        self.done = True


_check_modes = check_modes  # the name this module had for it
