"""``regcache validate``: LightningCLI over QuantizedEncoder + ValidationSuite, with composable configs.

A config may start with ``defaults: [piece.yaml, ...]`` (paths relative to the file): the pieces
are merged in order, then the file itself on top, so the paper's grid is a few lines per run.
Several ``--config`` files compose the same way: they are deep-merged in order into one
configuration (mappings merge key by key, so a piece adds its ``data.datasets`` settings instead of
replacing the others; lists and scalars are replaced), which takes the place of the first
``--config``; dotted overrides (``--data.root /data``, ``--model.w_bits 6``) after it apply on top.
``model.method_options`` is checked against the method's config dataclass after the parse (an unknown
key, a value of the wrong type or an unknown method is an error naming it) and replaced by every field's
effective value, so ``--print_config``, config.yaml and run.json show the method's whole configuration.
Everything else is plain LightningCLI (``--print_config``, ...).
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CALLBACKS = (
    "callbacks.calibration.Calibration",
    "callbacks.validation.ZeroShotValidation",
    "callbacks.validation.RetrievalValidation",
    "callbacks.validation.KNNValidation",
    "callbacks.validation.FidelityValidation",
    "callbacks.validation.PatchTokenFidelityValidation",
    "callbacks.outliers.OutlierReport",
)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins, lists are replaced."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def compose(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Load a YAML config, resolving its ``defaults`` pieces recursively."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path in _seen:
        raise ValueError(f"config defaults form a cycle: {' -> '.join(map(str, (*_seen, path)))}")
    data = yaml.safe_load(path.read_text()) or {}
    merged: dict[str, Any] = {}
    for piece in data.pop("defaults", []) or []:
        merged = deep_merge(merged, compose(path.parent / piece, (*_seen, path)))
    return deep_merge(merged, data)


def _config_value(argv: list[str], i: int) -> tuple[str | None, int]:
    """``(FILE, next index)`` where ``argv[i]`` is ``--config FILE`` or ``--config=FILE``, else ``(None, i)``."""
    arg = argv[i]
    if arg == "--config":
        if i + 1 >= len(argv):
            raise ValueError("--config needs a file: --config FILE")
        return argv[i + 1], i + 2
    if arg.startswith("--config="):
        return arg.split("=", 1)[1], i + 1
    return None, i


def compose_all(paths: list[str | Path]) -> dict[str, Any]:
    """Deep-merge several configs (each with its ``defaults`` resolved) in order, the last one winning."""
    merged: dict[str, Any] = {}
    for path in paths:
        merged = deep_merge(merged, compose(path))
    return merged


def default_run_dir(paths: list[str | Path]) -> str:
    """``runs/<stem>`` for one config, ``runs/<stem1>_<stem2>...`` for a composition (distinct per composition)."""
    return "runs/" + "_".join(Path(p).stem for p in paths)


def _expand_configs(argv: list[str], workdir: Path) -> list[str]:
    """Merge every ``--config FILE`` into one composed file at the first one's place; default the run dir."""
    out: list[str] = []
    paths: list[str] = []
    first = None
    i = 0
    while i < len(argv):
        value, nxt = _config_value(argv, i)
        if value is None:
            out.append(argv[i])
            i += 1
            continue
        if first is None:
            first = len(out)
        paths.append(value)
        i = nxt
    if not paths:
        return out
    config = compose_all(paths)
    model = config.setdefault("model", {})
    if isinstance(model, dict):
        model.setdefault("run_dir", default_run_dir(paths))
    composed = workdir / "composed.yaml"
    composed.write_text(yaml.safe_dump(config, sort_keys=False))
    return [*out[:first], "--config", str(composed), *out[first:]]


def _trainer_class() -> type:
    """``pl.Trainer`` whose ``limit_*_batches`` parse as Lightning documents: int = batches, float = fraction."""
    from regcache._lightning import pl

    class Trainer(pl.Trainer):
        """The Lightning Trainer; only the batch limits' type hints differ (int tried before float).

        Lightning annotates them ``Optional[Union[int, float]]``, but ``typing`` caches unions as equal
        regardless of their order, so depending on what was imported before, the hint can come out as
        ``Union[float, int, None]``: jsonargparse then tries float first and ``1`` became ``1.0`` (100 %).

        Args:
            limit_train_batches: training batches per epoch (int) or the fraction of them (float).
            limit_val_batches: validation batches (int) or the fraction of the validation set (float).
            limit_test_batches: test batches (int) or the fraction of the test set (float).
            limit_predict_batches: prediction batches (int) or the fraction of them (float).
        """

        def __init__(
            self,
            *,
            limit_train_batches: int | float | None = None,
            limit_val_batches: int | float | None = None,
            limit_test_batches: int | float | None = None,
            limit_predict_batches: int | float | None = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(
                limit_train_batches=limit_train_batches,
                limit_val_batches=limit_val_batches,
                limit_test_batches=limit_test_batches,
                limit_predict_batches=limit_predict_batches,
                **kwargs,
            )

    return Trainer


def default_logger(run_dir: str | Path) -> Any:
    """``CSVLogger`` writing ``<run_dir>/logs/version_<n>/{metrics.csv,hparams.yaml}`` (a new version per run)."""
    from regcache._lightning import pl

    return importlib.import_module(f"{pl.__name__}.loggers").CSVLogger(save_dir=str(run_dir), name="logs")


def resolve_method_options(config: Any) -> None:
    """Set ``model.method_options`` of a parsed configuration (or its subcommand's) to the method's full options.

    Every dataclass field besides the bits, defaults included; raises
    :class:`~regcache.quant.MethodConfigError` on an unknown method, key or a value of the wrong type.
    """
    from regcache.module import resolved_method_options

    if config.get("subcommand"):
        config = config[config["subcommand"]]
    model = config["model"]
    model["method_options"] = resolved_method_options(
        model["method"], model["w_bits"], model["a_bits"], model.get("method_options")
    )


def run_cli(argv: list[str]) -> Any:
    """Instantiate and run the LightningCLI on already-expanded arguments."""
    import callbacks.calibration
    import callbacks.outliers
    import callbacks.validation  # noqa: F401
    from datamodules.suite import ValidationSuite
    from regcache._lightning import pl
    from regcache.module import QuantizedEncoder
    from regcache.runrecord import claim_run_dir, run_identity, write_run_identity

    cli_module = importlib.import_module(f"{pl.__name__}.cli")

    class RunDirConfig(cli_module.SaveConfigCallback):
        """Save the resolved config as ``<run_dir>/config.yaml`` (not in the working directory)."""

        def setup(self, trainer: pl.Trainer, pl_module: QuantizedEncoder, stage: str) -> None:
            """Write the config once, on global rank zero, into the module's run directory."""
            if self.already_saved:
                return
            if trainer.is_global_zero:
                path = Path(pl_module.run_dir) / self.config_filename
                path.parent.mkdir(parents=True, exist_ok=True)
                self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)
                config = {k: v for k, v in self.config.as_dict().items() if k != "config"}  # "config": temp files
                write_run_identity(pl_module.run_dir, run_identity(json.loads(json.dumps(config, default=str))))
                for logger in trainer.loggers:  # the resolved configuration as the run's hyper-parameters
                    logger.log_hyperparams({"config": json.loads(json.dumps(config, default=str))})
            self.already_saved = True

    class ValidateCLI(cli_module.LightningCLI):
        """LightningCLI whose default logger (``trainer.logger`` unset or true) is a CSVLogger in the run directory.

        After the parse, ``model.method_options`` is checked against the method's config dataclass and
        replaced by every field's effective value (:func:`resolve_method_options`), before ``--print_config``
        prints it and before the run directory's identity or config.yaml records it.
        """

        def parse_arguments(self, parser: Any, args: Any) -> None:
            """Parse as LightningCLI does, then resolve the method's options; ``--print_config`` prints the result."""
            from jsonargparse._actions import _ActionPrintConfig

            with _ActionPrintConfig.skip_print_config():
                super().parse_arguments(parser, args)
            try:
                resolve_method_options(self.config)
            except ValueError as e:
                parser.error(str(e))
            _ActionPrintConfig.print_config_if_requested(parser, self.config)

        def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
            """The trainer, with :func:`default_logger` where the configuration names no logger.

            First the run directory is claimed (:func:`regcache.runrecord.claim_run_dir`): one holding
            another configuration's results is refused here, before the logger or anything else writes into it.
            """
            config = self.config[self.subcommand] if self.subcommand else self.config
            config = {k: v for k, v in config.as_dict().items() if k != "config"}
            self.model.run_key = claim_run_dir(
                self.model.run_dir, run_identity(json.loads(json.dumps(config, default=str)))
            )
            if self._get(self.config_init, "trainer", default={}).get("logger") in (None, True):
                kwargs["logger"] = default_logger(self.model.run_dir)
            return super().instantiate_trainer(**kwargs)

    def instantiate(dotted: str):
        module, _, name = dotted.rpartition(".")
        return getattr(sys.modules[module], name)()

    return ValidateCLI(
        QuantizedEncoder,
        ValidationSuite,
        trainer_class=_trainer_class(),
        args=argv,
        trainer_defaults={"callbacks": [instantiate(c) for c in DEFAULT_CALLBACKS]},
        save_config_callback=RunDirConfig,
    )


class ConfigError(ValueError):
    """``regcache validate``'s arguments do not parse (unknown key, wrong type, missing file)."""


def check_args(argv: list[str]) -> None:
    """Parse ``regcache validate`` arguments as a run would, building nothing; raise ConfigError if they fail."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with tempfile.TemporaryDirectory(prefix="regcache-config-") as tmp:
        try:
            expanded = _expand_configs(list(argv), Path(tmp))
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise ConfigError(str(e)) from e
        # --print_config stops after the parse: no model, data or trainer is instantiated
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run_cli(["validate", *expanded, "--print_config"])
            except SystemExit as e:
                if e.code not in (0, None):
                    text = err.getvalue()
                    start = text.find("error:")  # jsonargparse prints the usage first
                    message = (text[start:] if start >= 0 else text).strip()
                    raise ConfigError(message or f"exit status {e.code}") from None
                return
    raise ConfigError("the configuration was not checked (--print_config did not stop the parse)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``regcache validate``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from regcache.runrecord import RunDirConflict

    with tempfile.TemporaryDirectory(prefix="regcache-config-") as tmp:
        try:
            cli = run_cli(["validate", *_expand_configs(argv, Path(tmp))])
        except RunDirConflict as e:
            print(f"regcache validate: error: {e}", file=sys.stderr)
            return 2
    module = cli.model
    if cli.trainer.is_global_zero:
        print(f"results: {module.run_dir / 'metrics.json'}")
    return 0
