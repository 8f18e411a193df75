"""RegCache before calibration: sensitivity sweep → curation → register cache → grid search → install.

Multi-GPU: the sweep, the curation and the register caches are computed on rank 0 and broadcast
(they are cheap next to the search, and one source rules out rank disagreement); the grid
search's configurations are split across ranks (rank r takes configurations r, r+W, ...), each
rank saving its own resumable state, and the rows are gathered so every rank picks the same
winner. The winner (its register cache and the search table) is saved in the run directory
and reused by later runs unless ``force``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from regcache._lightning import pl
from regcache.eval import build_zeroshot_classifier
from regcache.quant.calibration import batch_images
from regcache.registers import (
    RegisterCache,
    SearchResult,
    curate_candidates,
    derive_cache,
    install_deletion,
    install_prefix,
    make_objective,
    sensitivity_sweep,
)
from regcache.registers import (
    RegisterSearch as GridSearch,
)
from regcache.registers.search import SEARCH_DTYPES, check_grid
from regcache.utils import write_json


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
            ``cosine`` or ``mse`` (label-free, to the float model's final embedding).
        l_q: sensitive block; None runs the sensitivity sweep.
        sweep_bits: bits of the sweep's one-block quantization (paper: W8A8).
        sweep_images: reference images used by the sweep.
        search_images: reference images scored per configuration.
        num_candidates: k of the streaming top-k curation (v1: 20).
        curation_layers_before: also curate up to this many blocks before l_q (v4 option: 3).
        taus, delete_ks: the grid (paper: τ ∈ 1..15, k̃ ∈ a small set).
        l_start_offsets: l_start = l_q - offset for each offset (0 = prefix from l_q on).
        modes: ablations: ``both``, ``prefix``, ``delete``.
        derivation: ``propagate`` (default) or ``in_context``.
        prefix_only_at_lq: install the prefix only in block l_q (DINOv2, paper v4).
        recalibrate: ``per_config`` (exact, default) or ``once`` (batched approximation).
        eval_batch_size: reference images per search forward (None: the reference loader's batches;
            the whole reference set at once is fastest where memory allows).
        compile_tail: ``torch.compile`` the search's tail forward (one compilation for the grid;
            scores agree with eager to float tolerance, not bit for bit). None: on where the model
            is on a GPU (1.8x per configuration on an H200, compile included), off on CPU, where
            compiling costs more than it saves.
        fused_attention: run the quantized attention as one Triton kernel during the grid (None: the
            process setting, on by default where the kernel applies, CUDA; scores to float tolerance).
        search_dtype: the dtype the grid runs in (``float32``, ``bfloat16``, ``float16``; None: the
            model's). ``bfloat16`` runs the grid on a bf16 copy of the float model: on GPUs several
            times faster than float32 (BENCHMARKS.md §5), with scores carrying bf16 rounding.
        save_every_s: at most this many seconds between writes of the resumable search state
            (what a preemption can lose; 0 writes after every configuration).
        force: recompute even if a saved result exists.
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
    ) -> None:
        if search_dtype is not None and search_dtype not in SEARCH_DTYPES:
            raise ValueError(f"search_dtype must be one of {sorted(SEARCH_DTYPES)} or null, got {search_dtype!r}")
        check_grid(taus=taus, delete_ks=delete_ks, l_start_offsets=l_start_offsets)  # null = default, [] = error
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
        self.modes = modes or ["both"]
        self.derivation = derivation
        self.prefix_only_at_lq = prefix_only_at_lq
        self.recalibrate = recalibrate
        self.eval_batch_size = eval_batch_size
        self.compile_tail = compile_tail
        self.fused_attention = fused_attention
        self.search_dtype = search_dtype
        self.save_every_s = save_every_s
        self.force = force
        self.done = False

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
        """The search objective; ``_objective(...)(labels[:n])`` scores a prefix of the reference."""
        if self.objective_name != "acc_ref":
            return lambda _labels=None: make_objective(self.objective_name)
        if not pl_module.has_text_tower or labels is None:
            raise ValueError("objective acc_ref needs a text tower and a labelled reference split; use cosine or mse")
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
            )
        return lambda subset=labels: make_objective("acc_ref", labels=subset, classifier=classifier)

    # ------------------------------------------------------------------ steps
    def _rank0_artifacts(
        self, trainer, pl_module, calibration, reference, labels, make_objective_for, out: Path
    ) -> dict[str, Any]:
        """Sweep (unless l_q is given), curation and register caches: computed on rank 0 only."""
        encoder, config = pl_module.encoder, pl_module.quant_config
        out.mkdir(parents=True, exist_ok=True)
        progress = trainer.progress_bar_callback is not None
        l_q = self.l_q
        sweep_summary = None
        if l_q is None:
            sweep_config = dataclasses.replace(config, w_bits=self.sweep_bits, a_bits=self.sweep_bits)
            subset = reference[: max(1, self.sweep_images // max(1, reference[0].shape[0]))]
            n_images = sum(x.shape[0] for x in subset)
            objective = make_objective_for(None if labels is None else labels[:n_images])
            sweep = sensitivity_sweep(encoder, sweep_config, calibration, subset, objective, progress=progress)
            sweep.save(out)
            l_q = sweep.l_q
            sweep_summary = sweep.table()
        layers = list(range(max(0, l_q - self.curation_layers_before), l_q + 1))
        candidates = curate_candidates(encoder, reference, layers, k=self.num_candidates, progress=progress)
        candidates.save(out / "candidates.safetensors")
        caches = {}
        for offset in self.l_start_offsets:
            l_start = max(0, l_q - offset)
            caches[l_start] = derive_cache(encoder, candidates, l_start, self.derivation)
            caches[l_start].save(out / f"cache_lstart{l_start}.safetensors")
        # on the host for the broadcast: GPU tensors would unpickle onto rank 0's device on every rank
        return {"l_q": l_q, "caches": {s: c.to("cpu") for s, c in caches.items()}, "sweep": sweep_summary}

    def _compile_tail(self, pl_module: pl.LightningModule) -> bool:
        """compile_tail as given, or (None) whether the model is on a GPU."""
        return self.compile_tail if self.compile_tail is not None else pl_module.device.type == "cuda"

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Search (or reuse a saved winner of) the RegCache grid across ranks and install the best prefix / deletion."""
        if self.done or pl_module.quant_config is None:
            return
        out = pl_module.run_dir / "regcache"
        result_path = out / "search_result.json"
        encoder = pl_module.encoder
        start = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():
            with pl_module.timed("register_search.reference"):
                reference, labels = self._reference(trainer, pl_module, self.search_images)
            with pl_module.timed("register_search.objective"):
                make = self._objective(trainer, pl_module, labels)
                objective = make()
            steady = None  # this rank's steady seconds per configuration (None: the grid did not run here)
            if result_path.is_file() and not self.force:  # a finished search: reuse its winner
                data = json.loads(result_path.read_text())
                best, l_q, seconds = data["best"], data["spec"]["l_q"], data.get("search_seconds")
                cache = RegisterCache.load(out / f"cache_lstart{best['l_start']}.safetensors", encoder)
            else:
                with pl_module.timed("register_search.calibration_images"):
                    calibration = list(trainer.datamodule.calib_dataloader())
                with pl_module.timed("register_search.rank0_artifacts"):  # sweep, curation, caches
                    artifacts = (
                        self._rank0_artifacts(trainer, pl_module, calibration, reference, labels, make, out)
                        if trainer.is_global_zero
                        else None
                    )
                    artifacts = trainer.strategy.broadcast(artifacts, src=0)
                l_q = artifacts["l_q"]
                caches = {s: c.to(pl_module.device) for s, c in artifacts["caches"].items()}
                rank, world = trainer.global_rank, trainer.world_size
                search = GridSearch(
                    encoder,
                    pl_module.quant_config,
                    calibration,
                    reference,
                    objective,
                    l_q,
                    caches=caches,
                    taus=self.taus,
                    delete_ks=self.delete_ks,
                    l_starts=sorted(caches),
                    modes=self.modes,
                    prefix_only_at=l_q if self.prefix_only_at_lq else None,
                    recalibrate=self.recalibrate,
                    eval_batch_size=self.eval_batch_size,
                    compile_tail=self._compile_tail(pl_module),
                    fused_attention=self.fused_attention,
                    dtype=SEARCH_DTYPES.get(self.search_dtype),
                    save_every_s=self.save_every_s,
                    state_path=out / f"search_state.rank{rank}of{world}.json",
                    progress=trainer.progress_bar_callback is not None,
                )
                search.points = search.points[rank::world]
                grid_start = time.perf_counter()
                try:
                    partial = search.run()
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
                best = result.best
                seconds = time.perf_counter() - start
                if trainer.is_global_zero:
                    write_json(
                        result_path, {**result.to_dict(), "search_seconds": seconds, "sweep": artifacts["sweep"]}
                    )
                cache = caches[best["l_start"]]
        if best["register"] is not None and best["tau"] > 0:
            install_prefix(
                encoder, cache.entry(best["register"]), best["tau"], only=l_q if self.prefix_only_at_lq else None
            )
        install_deletion(encoder, l_q, best["delete_k"])
        pl_module.add_time("register_search", time.perf_counter() - start)
        pl_module.results["regcache"] = {
            "l_q": l_q,
            "l_start": best["l_start"],
            "tau": best["tau"],
            "k_delete": best["delete_k"],
            "register": best["register"],
            "mode": best["mode"],
            "objective": self.objective_name,
            "objective_score": best["score"],
            "search_seconds": seconds,
            "steady_ms_per_config": None if steady is None else round(1e3 * steady, 2),
            "result": str(result_path),
        }
        self.done = True
