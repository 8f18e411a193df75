"""Every command in the README's fenced bash blocks is run here at tiny scale, run by a named test elsewhere,
or listed with the reason it needs a GPU / cluster; a new README command fails this test until it is one of them."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from regcache.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DEMO_CONFIG = "train_configs/demo.yaml"
# the demo config with nothing searched, one evaluation batch: a validate run of a few seconds
QUICK = ["--trainer.callbacks.init_args.enabled=false", "--model.fidelity=false", "--trainer.limit_val_batches=1"]

# commands another test runs as the README writes them: command -> "tests/<file>.py::<test>"
ELSEWHERE = {
    "pip install -e '.[test]' && pip install --no-deps clip-benchmark==1.6.2 && python -m pytest -q": (
        "tests/test_readme.py::test_two_setup_commands_and_ci_runs_the_test_command"
    ),
    "regcache validate --config train_configs/base.yaml --config train_configs/data/paper.yaml --config "
    "train_configs/models/openclip_b16_laion2b.yaml --config train_configs/methods/naive.yaml --config "
    "train_configs/bits/w6a6.yaml --data.root /datasets/clip_benchmark --trainer.devices 4": (
        "tests/test_cli_compose.py::test_readme_composed_command_runs_on_the_documented_layout"
    ),
    "regcache submit --config train_configs/base.yaml --config train_configs/data/paper.yaml --config "
    "train_configs/models/openclip_b16_laion2b.yaml --config train_configs/methods/naive.yaml --config "
    "train_configs/bits/w6a6.yaml --nodes 2 --gpus-per-node 4 --partition gpu --time 02:00:00 --data.root "
    "/datasets/clip_benchmark --dry-run": "tests/test_submit.py::test_readme_submit_command_dry_run",
}
GRID_LOOP = (
    "for cfg in train_configs/grid/clip_b16_openai_*.yaml; do",
    'regcache validate --config "$cfg" --data.root /datasets/clip_benchmark',
    "done",
)
TORCHRUN = (
    "torchrun --standalone --nproc_per_node 4 -m regcache.cli validate --config "
    "train_configs/grid/clip_b16_openai_naive_w6a6_regcache.yaml --data.root /datasets/clip_benchmark "
    "--trainer.devices 4 --trainer.strategy ddp"
)
# commands run in this file: command -> test here
HERE = {
    "pip install -e . && regcache demo": "test_demo_command_runs_at_tiny_scale",
    "regcache validate --config train_configs/demo.yaml --print_config": "test_print_config_command",
    **dict.fromkeys(GRID_LOOP, "test_grid_loop_configs_parse"),
    "regcache report runs/clip_b16_openai_*/ --out clip_b16_openai.md": "test_report_command",
    TORCHRUN: "test_torchrun_command_parses",
}
# what cannot run on a CPU test machine, and what of it is checked here instead
NEEDS_MORE = {
    GRID_LOOP[1]: "OpenAI's ViT-B/16 weights and the six CLIP_benchmark datasets (a GPU machine): every "
    "config the loop visits is parsed with the command's options; the grid's composition is "
    "tests/test_train_configs.py's",
    TORCHRUN: "4 ranks with --trainer.devices 4 need 4 GPUs: torchrun's options and validate's configuration "
    "(devices 4, ddp) are parsed; 2 CPU ranks run in tests/test_data_distributed.py",
}


def fenced_commands() -> list[str]:
    """The README's bash commands: continuation lines joined, trailing comments dropped, whitespace collapsed."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s+#\s", line)[0]
            if line.strip():
                commands.append(" ".join(line.split()))
    return commands


def _argv(command: str) -> list[str]:
    """The ``regcache`` part of a README command as argv."""
    words = shlex.split(command)
    return words[words.index("regcache") + 1 :]


def test_every_readme_command_is_covered():
    commands = fenced_commands()
    assert len(commands) >= 10, commands  # the parser found the blocks
    uncovered = [c for c in commands if c not in ELSEWHERE and c not in HERE]
    assert not uncovered, f"README commands no test runs (add them to this file): {uncovered}"
    stale = [c for c in [*ELSEWHERE, *HERE, *NEEDS_MORE] if c not in commands]
    assert not stale, f"commands listed here that the README no longer has: {stale}"
    for where in ELSEWHERE.values():
        path, name = where.split("::")
        assert f"\ndef {name}(" in (ROOT / path).read_text(), where
    for name in HERE.values():
        assert callable(globals().get(name)), name


def test_demo_command_runs_at_tiny_scale(tmp_path, monkeypatch, capsys):
    """`regcache demo` on a one-register grid without the RepQ-ViT rows (CI installs the package as `pip install -e`
    of the test extra, .ci/run)."""
    command = next(c for c in HERE if c.endswith("regcache demo"))
    monkeypatch.chdir(tmp_path)
    tiny = ["--strong-method", "none", "--taus", "1", "--delete-ks", "0,1", "--num-candidates", "1", "--quiet"]
    assert cli_main([*_argv(command), *tiny]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "results: demo/results.json"
    rows = [r["name"] for r in json.loads((tmp_path / "demo" / "results.json").read_text())["rows"]]
    assert rows[:3] == ["float", "naive W6A6", "naive W6A6 + RegCache"]


def test_print_config_command(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exc:
        cli_main(_argv("regcache validate --config train_configs/demo.yaml --print_config"))
    assert exc.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["model"] == "regcache-testbed" and config["data"]["root"] == "builtin"


def test_grid_loop_configs_parse(capsys, monkeypatch):
    """The loop's glob finds the grid's configs and each parses with the loop's options (the run needs CLIP weights)."""
    monkeypatch.chdir(ROOT)
    configs = sorted(ROOT.glob(shlex.split(GRID_LOOP[0])[3].rstrip(";")))
    assert len(configs) >= 20  # float + 4 methods x 3 bit widths, with and without RegCache
    for config in configs:
        argv = [w.replace("$cfg", config.relative_to(ROOT).as_posix()) for w in shlex.split(GRID_LOOP[1])[1:]]
        with pytest.raises(SystemExit) as exc:
            cli_main([*argv, "--print_config"])
        assert exc.value.code in (0, None), config
        parsed = yaml.safe_load(capsys.readouterr().out)
        assert parsed["data"]["root"] == "/datasets/clip_benchmark", config
        assert parsed["model"]["model"] == "ViT-B-16-quickgelu" and parsed["model"]["pretrained"] == "openai", config


def test_report_command(tmp_path, monkeypatch, capsys):
    """Two tiny runs under runs/clip_b16_openai_*/ (the demo config, nothing searched), then the README's report."""
    monkeypatch.chdir(tmp_path)
    for name, extra in (("naive_w6a6", []), ("naive_w8a8", ["--model.w_bits=8", "--model.a_bits=8"])):
        argv = ["validate", "--config", str(ROOT / DEMO_CONFIG), *QUICK, *extra]
        assert cli_main([*argv, f"--model.run_dir=runs/clip_b16_openai_{name}"]) == 0
    capsys.readouterr()
    words = shlex.split("regcache report runs/clip_b16_openai_*/ --out clip_b16_openai.md")
    runs = sorted(str(p) + "/" for p in tmp_path.glob(words[2]))  # the shell's expansion of the glob
    assert len(runs) == 2
    assert cli_main([words[1], *runs, *words[3:]]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| model | bits | method |") and "cifar10_sample/zeroshot_top1" in table[0]
    assert sorted(row.split(" | ")[1] for row in table[2:]) == ["W6A6", "W8A8"]
    assert (tmp_path / "clip_b16_openai.md").read_text().strip() == "\n".join(table)


def test_torchrun_command_parses(capsys, monkeypatch):
    from torch.distributed.run import get_args_parser

    words = shlex.split(TORCHRUN)
    module_at = words.index("-m")
    args = get_args_parser().parse_args([*words[1:module_at], "-m", *words[module_at + 1 :]])
    assert (args.standalone, args.nproc_per_node, args.module) == (True, "4", True)
    assert args.training_script == "regcache.cli" and args.training_script_args[0] == "validate"
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exc:
        cli_main([*args.training_script_args, "--print_config"])
    assert exc.value.code in (0, None)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert (str(trainer["devices"]), trainer["strategy"]) == ("4", "ddp")


def test_make_shards_commands_run(tmp_path):
    """The inline `regcache make-shards imagefolder SRC OUT` / `coco IMAGE_DIR CAPTIONS_JSON OUT` forms."""
    from PIL import Image

    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (0, 99, 0)).save(src / c / "0.png")
    assert "`regcache make-shards imagefolder SRC OUT`" in README
    assert cli_main(["make-shards", "imagefolder", str(src), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "test" / "nshards.txt").read_text().strip() == "1"
    assert "`regcache make-shards coco IMAGE_DIR CAPTIONS_JSON OUT [--karpathy dataset_coco.json]`" in README
    captions = {"images": [{"id": 1, "file_name": "0.png"}], "annotations": [{"image_id": 1, "caption": "x"}]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    argv = ["make-shards", "coco", str(src / "a"), str(tmp_path / "captions.json"), str(tmp_path / "coco")]
    assert cli_main(argv) == 0
    assert (tmp_path / "coco" / "dataset_type.txt").read_text().strip() == "retrieval"
