"""`regcache demo` on the committed testbed (reduced grid): rows, JSON keys, the RegCache effect, its agreement with
`regcache validate --config train_configs/demo.yaml`, and the demo on another dataset (`--data`, `--reference`)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from regcache.cli import main as cli_main
from regcache.data.make_shards import write_imagefolder_shards
from regcache.demo import BATCH_SIZE, CALIB_SIZE, DEMO_CANDIDATES, DEMO_DELETE_KS, DEMO_TAUS, run_demo

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "train_configs" / "demo.yaml"
SMALL_GRID = {"taus": (1, 3), "delete_ks": (0, 3), "num_candidates": 2}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    path = run_demo(out, strong_method=None, progress=False, **SMALL_GRID)
    return out, json.loads(path.read_text())


def test_demo_rows_and_regcache_recovers_naive_w6a6(demo):
    out, result = demo
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == [
        "float",
        "naive W6A6",
        "naive W6A6 + RegCache",
        "naive W6A6 + prefix only",
        "naive W6A6 + delete only",
    ]
    for r in rows.values():
        assert {"name", "method", "w_bits", "a_bits", "regcache", "zeroshot_top1", "max_token_norm_lq"} <= set(r)
        assert 0.0 <= r["zeroshot_top1"] <= 1.0
    assert result["constructed"] and result["l_q"] == rows["naive W6A6 + RegCache"]["regcache"]["l_q"]
    fp, naive, both = (rows[n]["zeroshot_top1"] for n in ("float", "naive W6A6", "naive W6A6 + RegCache"))
    assert naive < fp - 0.15  # naive W6A6 loses at least 15 points on the testbed
    assert both - naive > 0.5 * (fp - naive)  # RegCache recovers most of the loss
    # the massive tokens after l_q are gone once RegCache deletes their sources
    assert rows["naive W6A6 + RegCache"]["max_token_norm_lq"] < 0.2 * rows["naive W6A6"]["max_token_norm_lq"]
    assert rows["naive W6A6 + prefix only"]["regcache"]["k_delete"] == 0
    assert rows["naive W6A6 + prefix only"]["regcache"]["mode"] == "prefix"
    assert rows["naive W6A6 + delete only"]["regcache"]["tau"] == 0
    assert rows["naive W6A6 + delete only"]["regcache"]["mode"] == "delete"
    assert result["data"]["evaluation"]["images"] == 500 and result["data"]["reference"]["images"] == 300
    assert result["data"]["calibration"]["images"] == CALIB_SIZE
    assert (out / "results.md").is_file() and (out / "norm_profile.png").is_file()


def test_demo_config_runs_the_demos_settings():
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    search = config["trainer"]["callbacks"][0]["init_args"]
    assert (tuple(search["taus"]), tuple(search["delete_ks"])) == (DEMO_TAUS, DEMO_DELETE_KS)
    assert search["num_candidates"] == DEMO_CANDIDATES and search["modes"] == ["prefix", "both"]
    data = config["data"]
    assert data["batch_size"] == BATCH_SIZE and data["seed"] == 0
    assert data["datasets"]["cifar10_sample"]["calib_size"] == CALIB_SIZE
    assert data["datasets"]["cifar10_sample"].get("ref_size") is None  # the whole train split, as the demo


def test_demo_config_through_validate_gives_the_demos_rows(demo, tmp_path):
    """Same data, calibration draw and (reduced) grid: validate's RegCache and RegCache-off runs are the demo's rows."""
    from regcache.lightning_cli import main as validate_main

    rows = {r["name"]: r for r in demo[1]["rows"]}
    grid = [
        f"--trainer.callbacks.init_args.{k}=[{','.join(map(str, v))}]"
        for k, v in SMALL_GRID.items()
        if k != "num_candidates"
    ]
    grid += [f"--trainer.callbacks.init_args.num_candidates={SMALL_GRID['num_candidates']}", "--model.fidelity=false"]
    runs = {}
    for name, extra in (("regcache", []), ("naive", ["--trainer.callbacks.init_args.enabled=false"])):
        run_dir = tmp_path / name
        assert validate_main(["--config", str(DEMO_CONFIG), f"--model.run_dir={run_dir}", *grid, *extra]) == 0
        runs[name] = json.loads((run_dir / "metrics.json").read_text())
    demo_rc = rows["naive W6A6 + RegCache"]["regcache"]
    rc = runs["regcache"]["regcache"]
    keys = ("l_q", "l_start", "tau", "k_delete", "register", "mode")
    assert {k: rc[k] for k in keys} == {k: demo_rc[k] for k in keys}
    assert runs["regcache"]["num_samples"] == {"cifar10_sample": 500}
    top1 = runs["regcache"]["metrics"]["cifar10_sample/zeroshot_top1"]
    assert top1 == pytest.approx(rows["naive W6A6 + RegCache"]["zeroshot_top1"], abs=1e-6)
    assert runs["naive"]["regcache"] is None
    naive = runs["naive"]["metrics"]["cifar10_sample/zeroshot_top1"]
    assert naive == pytest.approx(rows["naive W6A6"]["zeroshot_top1"], abs=1e-6)


COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def _folder(root: Path, split: str, n: int) -> Path:
    folder = root / f"folder_{split}"
    for c, rgb in COLORS.items():
        (folder / c).mkdir(parents=True)
        for i in range(n):
            noise = np.random.default_rng(hash((split, c, i)) % 2**32).integers(-25, 25, (40, 40, 3))
            Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(folder / c / f"{i}.png")
    return folder


def test_demo_runs_on_another_dataset(tmp_path, capsys):
    """`regcache demo --data ... --reference ...` on shards written here: rows for these images, float row checked."""
    from regcache.testbed import load_testbed
    from regcache.testbed.data import iter_shard_samples

    evaluation, reference = tmp_path / "colors_eval", tmp_path / "colors_ref"
    write_imagefolder_shards(_folder(tmp_path, "test", 4), evaluation, split="test", templates=["a {c} square."])
    write_imagefolder_shards(_folder(tmp_path, "val", 5), reference, split="val", templates=["a {c} square."])
    out = tmp_path / "out"
    args = ["demo", "--data", str(evaluation), "--reference", str(reference), "--reference-split", "val"]
    args += ["--calib-size", "6", "--out", str(out), "--strong-method", "none", "--quiet"]
    args += ["--taus", "1,3", "--delete-ks", "0,2", "--num-candidates", "2"]
    assert cli_main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"results: {out / 'results.json'}"
    result = json.loads((out / "results.json").read_text())
    assert result["data"]["evaluation"] == {"root": str(evaluation), "split": "test", "images": 12}
    assert result["data"]["reference"] == {"root": str(reference), "split": "val", "images": 15}
    assert result["data"]["calibration"]["images"] == 6
    rows = {r["name"]: r for r in result["rows"]}
    assert len(rows) == 5 and rows["naive W6A6 + delete only"]["regcache"]["mode"] == "delete"
    for r in rows.values():  # a fraction of the 12 evaluation images
        assert r["zeroshot_top1"] * 12 == pytest.approx(round(r["zeroshot_top1"] * 12))
    # the float row, computed directly on the evaluation shards
    loaded = load_testbed()
    with torch.no_grad():
        text = loaded.model.encode_text(loaded.tokenizer([f"a {c} square." for c in COLORS]))
        text = torch.nn.functional.normalize(text, dim=-1)
        correct = ambiguous = 0
        for _, data, label in iter_shard_samples(evaluation, "test"):
            with Image.open(io.BytesIO(data)) as image:
                x = loaded.preprocess(image.convert("RGB"))[None]
            scores = (torch.nn.functional.normalize(loaded.model.encode_image(x), dim=-1) @ text.T)[0]
            top2 = scores.topk(2).values
            if top2[0] - top2[1] < 1e-4:  # a near tie: batching and thread count may round it either way
                ambiguous += 1
            else:
                correct += int(scores.argmax() == label)
    assert correct <= rows["float"]["zeroshot_top1"] * 12 <= correct + ambiguous + 1e-6


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--split", "missing"], r"--data .*: no split 'missing'"),
        (["--reference-split", "test"], "--reference-split 'test' is the evaluation split of the same root"),
        (["--calib-size", "0"], "--calib-size must be >= 1"),
    ],
)
def test_demo_rejects_bad_data_options_naming_them(args, match, capsys):
    from regcache.demo import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", "unused", "--quiet", *args])
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err)
