"""Config composition of repeated ``--config`` files: the README's composed command keeps every piece."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from regcache.data.make_shards import write_coco_shards, write_imagefolder_shards
from regcache.lightning_cli import compose_all
from regcache.lightning_cli import main as validate_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "train_configs"
README = (ROOT / "README.md").read_text()
COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
# CLIP_benchmark folder names, as the README lists them
CLASSIFICATION = ("wds_imagenet1k", "wds_cars", "wds_vtab-flowers", "wds_food101", "wds_vtab-cifar100")
TINY = ["--model.model", "regcache-tiny-vit", "--model.pretrained", "null"]
CPU = ["--trainer.devices", "1", "--trainer.accelerator", "cpu", "--data.num_workers", "0", "--data.batch_size", "8"]


def readme_command(program: str) -> list[str]:
    """The README's first ``regcache <program> --config train_configs/base.yaml ...`` command, as argv."""
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(f"regcache {program} --config train_configs/base.yaml"):
                return shlex.split(line)[2:]
    raise AssertionError(f"no composed `regcache {program}` command in the README")


def _image(rgb: tuple[int, int, int], seed: int) -> Image.Image:
    noise = np.random.default_rng(seed).integers(-25, 25, (20, 20, 3))
    return Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8))


def write_readme_layout(root: Path, per_class: int = 2) -> dict[str, int]:
    """Tiny CLIP_benchmark folders under ``root`` named as the README says; returns test samples per folder."""
    counts = {}
    for folder in CLASSIFICATION:
        splits = ("test", "train") if folder == "wds_imagenet1k" else ("test",)
        for split in splits:
            src = root / "src" / folder / split
            for c, rgb in COLORS.items():
                (src / c).mkdir(parents=True)
                for i in range(per_class):
                    _image(rgb, hash((folder, split, c, i)) % 2**32).save(src / c / f"{i}.png")
            write_imagefolder_shards(src, root / folder, split=split, shard_size=4, templates=["a {c} photo."])
        counts[folder] = per_class * len(COLORS)
    images = root / "src" / "coco"
    images.mkdir(parents=True)
    coco: dict = {"images": [], "annotations": []}
    for i, (c, rgb) in enumerate(COLORS.items()):
        _image(rgb, 500 + i).save(images / f"{i}.png")
        coco["images"].append({"id": i, "file_name": f"{i}.png"})
        coco["annotations"] += [{"image_id": i, "caption": f"a {c} thing"}, {"image_id": i, "caption": f"{c} {i}"}]
    (root / "src" / "coco.json").write_text(json.dumps(coco))
    write_coco_shards(images, root / "src" / "coco.json", root / "wds_mscoco_captions", shard_size=4)
    counts["wds_mscoco_captions"] = len(COLORS)
    return counts


def _print_config(argv: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        validate_main([*argv, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def _pieces(argv: list[str]) -> list[Path]:
    return [ROOT / argv[i + 1] for i, a in enumerate(argv) if a == "--config"]


def test_readme_composed_command_keeps_every_dataset_path_and_split(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = readme_command("validate")
    pieces = [p.relative_to(CONFIGS).as_posix() for p in _pieces(argv)]
    expected = ["base.yaml", "data/paper.yaml", "models/openclip_b16_laion2b.yaml", "methods/naive.yaml"]
    assert pieces == [*expected, "bits/w6a6.yaml"]
    config = _print_config(argv, capsys)
    paper = yaml.safe_load((CONFIGS / "data" / "paper.yaml").read_text())["data"]
    naive = yaml.safe_load((CONFIGS / "methods" / "naive.yaml").read_text())
    datasets = config["data"]["datasets"]
    assert set(datasets) == set(paper["datasets"])  # all six, not only the method's imagenet1k
    for name, options in paper["datasets"].items():
        expected = {**options, **naive["data"]["datasets"].get(name, {})}
        assert {k: datasets[name][k] for k in expected} == expected, name
    assert datasets["imagenet1k"]["path"] == "wds_imagenet1k" and datasets["imagenet1k"]["calib_split"] == "train"
    assert (config["data"]["calibration"], config["data"]["reference"]) == ("imagenet1k", "imagenet1k")
    assert config["data"]["root"] == "/datasets/clip_benchmark"  # the command's override on top
    base = yaml.safe_load((CONFIGS / "base.yaml").read_text())
    assert config["data"]["batch_size"] == base["data"]["batch_size"] and config["model"]["fidelity"] is True
    model = config["model"]
    assert (model["model"], model["pretrained"], model["method"]) == ("ViT-B-16", "laion2b_s34b_b88k", "naive")
    assert (model["w_bits"], model["a_bits"], str(config["trainer"]["devices"])) == (6, 6, "4")
    # a run directory of its own: another method or bit width composed alike must not share its calibration
    assert model["run_dir"] == "runs/base_paper_openclip_b16_laion2b_naive_w6a6"


def test_repeated_configs_merge_in_order_and_overrides_apply_on_top(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("model: {method: naive, w_bits: 8}\ndata: {datasets: {x: {path: px}}}\n")
    (tmp_path / "b.yaml").write_text("model: {w_bits: 6}\ndata: {datasets: {x: {calib_size: 3}, y: {path: py}}}\n")
    assert compose_all([tmp_path / "a.yaml", tmp_path / "b.yaml"]) == {
        "model": {"method": "naive", "w_bits": 6},
        "data": {"datasets": {"x": {"path": "px", "calib_size": 3}, "y": {"path": "py"}}},
    }
    argv = [f"--config={tmp_path / 'a.yaml'}", "--model.a_bits", "4", "--config", str(tmp_path / "b.yaml")]
    config = _print_config([*argv, "--model.w_bits", "5"], capsys)
    assert config["data"]["datasets"] == {"x": {"path": "px", "calib_size": 3}, "y": {"path": "py"}}
    assert (config["model"]["method"], config["model"]["w_bits"], config["model"]["a_bits"]) == ("naive", 5, 4)
    assert config["model"]["run_dir"] == "runs/a_b"
    with pytest.raises(ValueError, match="--config needs a file"):
        validate_main(["--config"])


def test_readme_composed_command_runs_on_the_documented_layout(tmp_path, monkeypatch, capsys):
    """The README's command end to end (tiny model, CPU) on folders named wds_imagenet1k, wds_mscoco_captions, ..."""
    counts = write_readme_layout(tmp_path / "clip_benchmark")
    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / "run"
    argv = [*readme_command("validate"), "--data.root", str(tmp_path / "clip_benchmark"), *CPU, *TINY]
    assert validate_main([*argv, "--model.run_dir", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"results: {run_dir / 'metrics.json'}"
    result = json.loads((run_dir / "metrics.json").read_text())
    paper = yaml.safe_load((CONFIGS / "data" / "paper.yaml").read_text())["data"]["datasets"]
    assert result["num_samples"] == {name: counts[o["path"]] for name, o in paper.items()}
    assert (result["method"], result["w_bits"], result["a_bits"]) == ("naive", 6, 6)
    assert result["calibration"]["loaded"] is False and Path(result["calibration"]["state"]).is_file()
    metrics = result["metrics"]
    for name in paper:
        kind = "text_retrieval_recall@1" if name == "mscoco" else "zeroshot_top1"
        assert 0.0 <= metrics[f"{name}/{kind}"] <= 1.0
