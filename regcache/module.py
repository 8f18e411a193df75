"""The LightningModule: a (quantized) encoder under evaluation. Metrics live in the callbacks.

``validation_step`` computes the image embedding once (and the float model's, for fidelity)
and returns it; ``callbacks.validation`` turn the outputs into zero-shot, retrieval, k-NN and
fidelity metrics, ``callbacks.calibration`` calibrates, ``callbacks.register_search`` installs
RegCache. Only orchestration here: the math is in ``regcache.encoders`` / ``regcache.quant``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from regcache._clock import IMPORTED_AT
from regcache._lightning import pl
from regcache.artifacts import ArtifactStore
from regcache.deploy import DeployConfig
from regcache.encoders import adapt
from regcache.eval.clip_benchmark import clip_benchmark_results, write_clip_benchmark_results
from regcache.kernels import KernelConfig, set_kernel_config
from regcache.kernels import fallbacks as kernel_fallbacks
from regcache.kernels import record as kernel_record
from regcache.loading import load_model
from regcache.quant import METHODS, MethodConfigError, QuantConfig, method_config, quantize_
from regcache.registers import plain_float
from regcache.registers._common import float_fingerprint
from regcache.runrecord import checkpoint_record, device_name, environment_record
from regcache.tracking import log_run_summary
from regcache.utils import write_json

log = logging.getLogger(__name__)


def bytecode_cache_hint(import_seconds: float, slow_s: float = 8.0) -> str | None:
    """Advice when start-up imports were slow because Python's bytecode cache is off (else None)."""
    if not sys.dont_write_bytecode or import_seconds < slow_s:
        return None
    # Without cached bytecode each process compiles torch, open_clip (timm, torchvision, transformers) and
    # Lightning from source, about three times the import time with a bytecode cache (BENCHMARKS.md §5).
    return (
        f"start-up imports took {import_seconds:.0f} s with Python's bytecode cache off (PYTHONDONTWRITEBYTECODE "
        "is set): where the installed packages carry no compiled bytecode, every process compiles torch, "
        "open_clip and Lightning from source; "
        "`unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=$HOME/.cache/pycache` (any writable folder) "
        "lets later runs and ranks reuse the compiled bytecode"
    )


def launched_by_lightning(trainer: pl.Trainer) -> bool:
    """Whether this process started the other ranks itself (one after another), not torchrun / SLURM."""
    # The launcher that started child scripts keeps their processes; the cluster environment
    # cannot tell once launched (the launcher then sets LOCAL_RANK=0 in this process too).
    return bool(getattr(getattr(trainer.strategy, "launcher", None), "procs", None))


FLOAT_METHODS = ("float", "fp", "none")


def build_quant_config(
    method: str, w_bits: int, a_bits: int, options: dict[str, Any] | None = None
) -> QuantConfig | None:
    """The method's config object, or None for the float model; unknown names, keys and bad values raise.

    Raises :class:`~regcache.quant.MethodConfigError` listing the valid method names or the method's
    fields, or naming the field whose value is wrong.
    """
    if method in FLOAT_METHODS:
        if options:
            raise MethodConfigError(f"method {method!r} (the float model) takes no options, got {sorted(options)}")
        return None
    if method not in METHODS:
        raise MethodConfigError(f"unknown method {method!r}; choose 'float' or one of: {', '.join(sorted(METHODS))}")
    return method_config(method, w_bits, a_bits, options)


def resolved_method_options(
    method: str, w_bits: int, a_bits: int, options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """``model.method_options`` as the run uses them: every field of the method besides the bits, defaults included."""
    config = build_quant_config(method, w_bits, a_bits, options)
    return None if config is None else config.options()


class QuantizedEncoder(pl.LightningModule):
    """An encoder (open_clip, hf-hub, timm or local checkpoint) with an optional PTQ method attached.

    Args:
        model: model name (``ViT-B-16``, ``hf-hub:...``, ``timm:...``, ``regcache-testbed``).
        pretrained: tag, local file or None (random init).
        image_size: input resolution override.
        method: ``float`` or a registered method: ``naive``, ``ptq4vit``, ``repq_vit``, ``noisyquant``,
            ``qdrop`` (block reconstruction), ``mixed`` (the sweep's mixed-precision plan over a base method)
            (``regcache methods`` lists each method's fields, types and defaults; docs/methods.md).
        w_bits: weight bit width (2..8).
        a_bits: activation bit width (2..8).
        method_options: the method's other fields (``{field: value}``), checked at start-up against its
            config dataclass: an unknown key or a value of the wrong type is an error naming it. The run
            records every field's effective value, defaults included (``--print_config`` shows them).
        fidelity: also run the float model on every batch and report feature cosine to it.
        run_dir: where the run's results (metrics.json, config.yaml, logs) go; a folder holding the results of
            another configuration is refused (``regcache.runrecord``).
        artifacts_dir: where the keyed artifacts (register search, calibration) go (None: the run directory);
            several runs may share one: each artifact's folder is keyed by what it depends on.
        force: recompute every artifact even where one of the same key exists.
        kernels: the numerics paths (fused attention and its exact mode / tile, fused fake quant, fused
            NoisyQuant search, float SDPA; :class:`regcache.kernels.KernelConfig`) set for the process; None
            keeps the process's (the ``REGCACHE_*`` variables, else the defaults). Recorded in metrics.json.
        matmul_precision: ``torch.set_float32_matmul_precision`` ("high": TF32 matmuls on GPUs).
        tokenizer: local folder (or hub id) of the Hugging Face tokenizer to use instead of the one the
            model config names (SigLIP / SigLIP2 where it is not in the Hugging Face cache).
        feature_layer: ``hf:`` towers only: end the tower at ``hidden_states[feature_layer]`` (``-2``: LLaVA's
            features); None keeps every block. Other families refuse it. Part of the model spec.
        deploy: evaluate the calibrated encoder on integer kernels (:class:`regcache.deploy.DeployConfig`:
            ``attention`` float / int8, ``backend`` auto / reference / triton; ``--model.deploy.attention=float``)
            instead of its fake-quant simulation; applied after calibration, recorded in metrics.json
            (``deploy``, ``run_record.deploy``). None (default): the simulation.
        export_onnx: write the calibrated encoder (RegCache prefix and deletion included) as a QDQ ONNX graph
            to this path on the first evaluation batch (:func:`regcache.deploy.export.export_onnx`; with
            ``deploy``, the graph of that deployment), checked in ONNX Runtime on that batch where it is
            installed; the summary goes to metrics.json (``export``). ``regcache export`` sets it.
    """

    def __init__(
        self,
        model: str = "regcache-tiny-vit",
        pretrained: str | None = None,
        image_size: int | None = None,
        method: str = "float",
        w_bits: int = 8,
        a_bits: int = 8,
        method_options: dict[str, Any] | None = None,
        fidelity: bool = True,
        run_dir: str = "runs/default",
        matmul_precision: str = "high",
        tokenizer: str | None = None,
        artifacts_dir: str | None = None,
        force: bool = False,
        kernels: KernelConfig | None = None,
        feature_layer: int | None = None,
        deploy: DeployConfig | None = None,
        export_onnx: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if kernels is not None:
            set_kernel_config(kernels)
        self._fallbacks_before = len(kernel_fallbacks())  # the run record holds this run's fallbacks only
        self.results: dict[str, Any] = {"metrics": {}, "outliers": {}, "regcache": None}
        # the installed RegCache winner (regcache.registers.SearchPoint), set by the register search callback
        self.regcache_point: Any = None
        built = time.perf_counter()
        self.add_time("startup.imports", built - IMPORTED_AT)
        self.loaded = load_model(
            model, pretrained, image_size=image_size, tokenizer=tokenizer, feature_layer=feature_layer
        )
        self._built_at = time.perf_counter()
        self.add_time("startup.model_build", self._built_at - built)
        self.net = self.loaded.model  # registered: moves with the module (text tower included)
        self.encoder = adapt(self.net)
        # before anything is installed or quantized: the float weights' identity, for artifact keys
        self.weights_fingerprint = float_fingerprint(self.encoder)
        self.quant_config = build_quant_config(method, w_bits, a_bits, method_options)
        self.deploy_config = DeployConfig(**deploy) if isinstance(deploy, dict) else deploy
        self.manifest = None  # attached by attach_method(), after any register search on the float model
        self.fidelity = fidelity and self.quant_config is not None
        self.run_dir = Path(run_dir)
        self._artifacts_dir = artifacts_dir
        self._artifacts: ArtifactStore | None = None
        self.run_key: str | None = None  # the configuration's key, set where the run directory is claimed
        self.dataset_names: list[str] = []

    # ---------------------------------------------------------------- model info
    @property
    def artifacts(self) -> ArtifactStore:
        """The keyed artifact store of the run (``artifacts_dir``, else the run directory)."""
        if self._artifacts is None:
            root = self._artifacts_dir if self._artifacts_dir is not None else self.run_dir
            self._artifacts = ArtifactStore(root, force=self.hparams.force)
        return self._artifacts

    def model_spec(self) -> dict[str, Any]:
        """What identifies the float model in artifact keys: name, weights tag, size, tokenizer, weights fingerprint."""
        spec = {
            "model": self.hparams.model,
            "pretrained": self.hparams.pretrained,
            "image_size": self.hparams.image_size,
            "tokenizer": self.hparams.tokenizer,
            "weights_fingerprint": self.weights_fingerprint,
        }
        if self.hparams.feature_layer is not None:  # unset leaves the keys of full-tower runs as they were
            spec["feature_layer"] = self.hparams.feature_layer
        return spec

    @property
    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        """The encoder's own image preprocessing (PIL → tensor)."""
        return self.loaded.preprocess

    @property
    def tokenizer(self) -> Callable[..., torch.Tensor] | None:
        """Text tokenizer (None for image-only encoders)."""
        return self.loaded.tokenizer

    @property
    def has_text_tower(self) -> bool:
        """Zero-shot / retrieval possible (else k-NN)."""
        return self.loaded.has_text_tower

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Text embeddings of raw strings (the text tower runs in float: only the vision tower is quantized)."""
        tokens = self.tokenizer(texts).to(self.device)
        return self.net.encode_text(tokens)

    def attach_method(self) -> None:
        """Attach the PTQ method's quantizers (once); the register search must run on the float model first."""
        if self.quant_config is not None and self.manifest is None:
            self.manifest = quantize_(self.encoder, self.quant_config)

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str) -> None:
        """Record start-up timings, set matmul precision, warn on slow starts and hand preprocessing to the data."""
        # startup = imports + model build + launch (trainer, process launch, DDP and CUDA init)
        now = time.perf_counter()
        self.add_time("startup", now - IMPORTED_AT)
        self.add_time("startup.launch", now - self._built_at)
        torch.set_float32_matmul_precision(self.hparams.matmul_precision)
        hint = bytecode_cache_hint(self.results["timings_s"]["startup.imports"])
        if hint is not None and self.trainer.is_global_zero:
            log.warning(hint)
        if self.trainer.world_size > 1 and self.trainer.is_global_zero and launched_by_lightning(self.trainer):
            log.warning(
                "ranks 1..%d were started by Lightning after this process had imported everything and built "
                "its model (%.0f s of start-up so far); starting all ranks together is faster: "
                "torchrun --standalone --nproc_per_node %d -m regcache.cli validate ... (or srun on SLURM)",
                self.trainer.world_size - 1,
                now - IMPORTED_AT,
                self.trainer.world_size,
            )
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_transform"):
            datamodule.set_transform(self.preprocess)
            if hasattr(datamodule, "set_model_kind"):
                datamodule.set_model_kind(quantized=self.quant_config is not None)
            self.dataset_names = list(datamodule.names)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings from the adapted (possibly quantized, RegCache-equipped) vision encoder."""
        return self.encoder(images)

    def add_time(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to ``timings_s[phase]`` of metrics.json (rank 0's clock; shows what does not shard).

        ``a.b`` names a part of phase ``a`` (counted in ``a`` too, by whoever times ``a``).
        """
        timings = self.results.setdefault("timings_s", {})
        timings[phase] = round(timings.get(phase, 0.0) + seconds, 3)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Time the ``with`` body into ``timings_s[phase]``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add_time(phase, time.perf_counter() - start)

    def deploy_encoder(self) -> None:
        """Swap the calibrated encoder for its integer deployment (``deploy``), once; fidelity keeps a float copy."""
        config = self.deploy_config
        if config is None or self.quant_config is None or getattr(self.encoder, "deploy_report", None) is not None:
            return
        import copy

        from regcache.deploy import deploy_

        with self.timed("deploy"):
            # the float passes (fidelity, the outlier report's "before") run on a fake-quant copy with its
            # quantizers off: integer modules have no float mode
            self._float_encoder = copy.deepcopy(self.encoder)
            report = deploy_(self.encoder, config)
        self.results["deploy"] = {"path": "integer", **report.to_dict()}
        log.info(
            "deployed %s on integer kernels (backend %s, attention %s)", report.method, report.backend, config.attention
        )

    def export_onnx(self, images: torch.Tensor) -> None:
        """Write the QDQ ONNX graph (``export_onnx``) traced on ``images`` and check it in ONNX Runtime on them."""
        from regcache.deploy.export import check_onnx, export_onnx

        if self.quant_config is None:
            raise ValueError("model.export_onnx exports a quantized encoder: set model.method (e.g. naive)")
        with self.timed("export"):
            deployed = getattr(self.encoder, "deploy_report", None) is not None
            source = self._float_encoder if deployed else self.encoder  # the calibrated fake-quant encoder
            summary = export_onnx(source, self.hparams.export_onnx, images[:1].cpu(), self.deploy_config)
            summary["check"] = check_onnx(summary["path"], source, images[:8].cpu(), self.deploy_config)
        self.results["export"] = summary
        log.info(
            "wrote %s (%d QuantizeLinear, %d int8 weights)",
            summary["path"],
            summary["quantize_linear"],
            summary["int8_weight_initializers"],
        )

    @contextlib.contextmanager
    def float_encoder(self) -> Iterator[Any]:
        """The float model: the fake-quant copy a deployed run keeps, else the encoder, with its quantizers off."""
        encoder = getattr(self, "_float_encoder", None)
        encoder = self.encoder if encoder is None else encoder
        with plain_float(encoder):
            yield encoder

    def on_validation_start(self) -> None:
        """Deploy where asked (calibration ran in the callbacks before), start the evaluation clock, zero the counts."""
        self.deploy_encoder()
        self._eval_start = time.perf_counter()
        self._counts = torch.zeros(max(len(self.dataset_names), 1), dtype=torch.long, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Embed the batch's images (and with the float model too for fidelity) for the metric callbacks."""
        images = batch["image"].to(self.device)
        self._counts[dataloader_idx] += images.shape[0]
        if self.hparams.export_onnx and "export" not in self.results and self.trainer.is_global_zero:
            self.export_onnx(images)
        if getattr(self, "patch_token_outputs", False):  # set by PatchTokenFidelityValidation
            from regcache.eval.patch_tokens import encode_patch_tokens

            features, tokens, positions = encode_patch_tokens(self.encoder, images)
            out = {"features": features, "patch_tokens": tokens, "patch_positions": positions}
            with self.float_encoder() as float_encoder:
                out["float_features"], out["float_patch_tokens"], _ = encode_patch_tokens(float_encoder, images)
            return out
        out = {"features": self.encoder(images)}
        if self.fidelity:
            with self.float_encoder() as float_encoder:
                out["float_features"] = float_encoder(images)
        return out

    def on_validation_end(self) -> None:
        """Record evaluation time, rank-summed sample counts and skipped samples, then write metrics.json."""
        self.add_time("evaluation", time.perf_counter() - self._eval_start)
        counts = self._counts.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        self.results["num_samples"] = {self.dataset_name(i): int(c) for i, c in enumerate(counts.tolist())}
        self.results["artifacts"] = self.artifacts.records()
        datamodule = getattr(self.trainer, "datamodule", None)
        self.results["run_record"] = self.run_record(datamodule)
        if datamodule is not None and hasattr(datamodule, "skipped_samples"):
            self.results["skipped_samples"] = datamodule.skipped_samples(self.device)
        if datamodule is not None and hasattr(datamodule, "shard_errors"):
            self.results["shard_errors"] = datamodule.shard_errors()
        self.write_results()
        if self.trainer.is_global_zero:
            self.write_clip_benchmark_results(datamodule)
            self.log_summary()

    def run_record(self, datamodule: Any) -> dict[str, Any]:
        """What made the numbers besides the configuration: code, weights, seeds, kernels, devices, data, artifacts.

        A collective under DDP (every rank's device is gathered): call it on every rank.
        """
        devices = [device_name(self.device)]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, devices[0])
            devices = gathered
        kernel = kernel_record()
        kernel["fallbacks"] = kernel["fallbacks"][self._fallbacks_before :]
        seed = os.environ.get("PL_GLOBAL_SEED")  # Lightning's seed_everything
        return {
            **environment_record(),
            "run_key": self.run_key,
            "checkpoint": checkpoint_record(self.loaded.checkpoint),
            "weights_fingerprint": self.weights_fingerprint,
            "seeds": {
                "seed_everything": None if seed is None else int(seed),
                "data": getattr(datamodule, "seed", None),
            },
            "kernels": kernel,
            "deploy": self._deploy_record(),
            "devices": devices,
            "world_size": self.trainer.world_size if self.trainer is not None else 1,
            "torch_threads": torch.get_num_threads(),  # CPU float rounding follows it
            "data": datamodule.selections() if hasattr(datamodule, "selections") else None,
            "artifacts": self.artifacts.records(),
        }

    def _deploy_record(self) -> dict[str, Any]:
        """Which path computed the quantized numbers: the fake-quant simulation or the integer kernels (and which)."""
        if self.quant_config is None:
            return {"path": "float"}
        report = getattr(self.encoder, "deploy_report", None)
        if report is None:
            return {"path": "simulation"}
        return {"path": "integer", "backend": report.backend, "attention": report.config.attention}

    def dataset_name(self, dataloader_idx: int) -> str:
        """Name under which a validation dataloader's metrics are reported."""
        return self.dataset_names[dataloader_idx] if dataloader_idx < len(self.dataset_names) else str(dataloader_idx)

    def describe(self) -> dict[str, Any]:
        """The run's identity for metrics.json."""
        cfg = self.quant_config
        layer = self.hparams.feature_layer
        return {
            "model": self.hparams.model,
            "pretrained": self.hparams.pretrained,
            **({} if layer is None else {"feature_layer": layer}),
            "method": cfg.name if cfg else "float",
            "w_bits": cfg.w_bits if cfg else None,
            "a_bits": cfg.a_bits if cfg else None,
            "method_options": cfg.to_dict() if cfg else None,
        }

    def quantization(self) -> dict[str, Any]:
        """The evaluated variant: method, bits and the installed RegCache configuration (None without RegCache)."""
        cfg, rc = self.quant_config, self.results.get("regcache")
        point = ("l_q", "l_start", "tau", "k_delete", "register", "mode", "objective")
        return {
            "method": cfg.name if cfg else "float",
            "w_bits": cfg.w_bits if cfg else None,
            "a_bits": cfg.a_bits if cfg else None,
            "regcache": None if rc is None else {k: rc.get(k) for k in point},
        }

    def write_clip_benchmark_results(self, datamodule: Any) -> list[Path]:
        """One CLIP_benchmark result JSON per (dataset, task) into ``<run_dir>/clip_benchmark/`` (for
        ``clip_benchmark build``); datasets without a CLIP_benchmark task (k-NN) have none."""
        if datamodule is None or not hasattr(datamodule, "benchmark_name"):
            return []
        datasets = {
            self.dataset_name(i): {"task": datamodule.dataset_task(i), "benchmark_name": datamodule.benchmark_name(i)}
            for i in range(len(self.dataset_names))
        }
        results = clip_benchmark_results(self.describe(), self.results["metrics"], datasets, self.quantization())
        return write_clip_benchmark_results(self.run_dir / "clip_benchmark", results)

    def log_summary(self) -> None:
        """Hand the loggers what metrics.json holds beside the metrics: configuration of the RegCache result,
        calibration, ``timings_s`` and the outlier / sensitivity plots (where the logger takes images)."""
        if not self.loggers:
            return
        images = {"outliers": self.run_dir / "outliers.png"}
        if self.results.get("regcache") is not None:  # the plot of the search whose result is installed
            images["sensitivity"] = Path(self.results["regcache"]["result"]).parent / "sensitivity.png"
        taken = log_run_summary(self.loggers, self.describe(), self.results, images, step=self.global_step)
        for logger in self.loggers:
            logger.save()
        log.info("logged the run summary to %s", ", ".join(f"{k} (images: {v or 'none'})" for k, v in taken.items()))

    def write_results(self, extra: dict[str, Any] | None = None) -> Path:
        """Write ``metrics.json`` into the run directory (rank 0 only) and return its path."""
        path = self.run_dir / "metrics.json"
        if self.trainer is None or self.trainer.is_global_zero:
            write_json(path, {**self.describe(), **self.results, **(extra or {})})
        return path
