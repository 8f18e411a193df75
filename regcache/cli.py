"""The ``regcache`` command: one subcommand per job, each a module with ``main(argv) -> int``."""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("regcache.demo", "run the pipeline on the embedded default model"),
    "validate": ("regcache.lightning_cli", "calibrate / search registers / evaluate (LightningCLI, --config FILE)"),
    "methods": ("regcache.method_listing", "list the quantization methods and their config fields / defaults"),
    "report": ("regcache.report", "turn several runs' metrics.json into the paper-style Markdown table"),
    "submit": ("regcache.slurm", "submit a validate run to SLURM (nodes × GPUs per node), or --dry-run"),
    "make-shards": ("regcache.data.make_shards", "write CLIP_benchmark webdataset shards from images / captions"),
    "export": ("regcache.deploy.export", "validate options + --output FILE.onnx: the calibrated encoder as QDQ ONNX"),
}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``regcache <command> [args]``."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: regcache <command> [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"regcache: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
