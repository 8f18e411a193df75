"""End to end: `regcache validate` on a tiny model and tiny shards through the CLI."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from regcache.data.make_shards import write_coco_shards, write_imagefolder_shards
from regcache.lightning_cli import compose
from regcache.lightning_cli import main as validate_main

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def _image(rgb, seed: int) -> Image.Image:
    noise = np.random.default_rng(seed).integers(-25, 25, (40, 40, 3))
    return Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    for split, n in (("test", 6), ("train", 4)):
        folder = root / f"folder_{split}"
        for c, rgb in COLORS.items():
            (folder / c).mkdir(parents=True)
            for i in range(n):
                _image(rgb, hash((split, c, i)) % 2**32).save(folder / c / f"{i}.png")
        write_imagefolder_shards(folder, root / "colors", split=split, shard_size=5, templates=["a {c} square."])
    imgs = root / "coco_images"
    imgs.mkdir()
    coco = {"images": [], "annotations": []}
    for i, (c, rgb) in enumerate(list(COLORS.items()) * 2):
        _image(rgb, 100 + i).save(imgs / f"{i}.png")
        coco["images"].append({"id": i, "file_name": f"{i}.png"})
        coco["annotations"] += [{"image_id": i, "caption": f"a {c} thing"}, {"image_id": i, "caption": f"{c} {i}"}]
    (root / "coco.json").write_text(json.dumps(coco))
    write_coco_shards(imgs, root / "coco.json", root / "captions", shard_size=4)
    return root


def _config(tmp_path: Path, shards: Path, method: str, **model) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        "model": {"model": "regcache-tiny-vit", "method": method, "run_dir": str(tmp_path / "run"), **model},
        "data": {
            "root": str(shards),
            "datasets": {
                "colors": {"calib_split": "train", "calib_size": 6, "ref_split": "train", "ref_size": 6},
                "captions": {},
            },
            "calibration": "colors",
            "reference": "colors",
            "batch_size": 4,
            "num_workers": 0,
        },
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(config: Path, *extra: str) -> dict:
    assert validate_main(["--config", str(config), *extra]) == 0
    return json.loads((Path(yaml.safe_load(config.read_text())["model"]["run_dir"]) / "metrics.json").read_text())


def test_validate_naive_writes_metrics_json(tmp_path, shards, capsys, monkeypatch):
    config = _config(tmp_path, shards, "naive", w_bits=6, a_bits=6)
    monkeypatch.chdir(tmp_path / "..")
    result = _run(config)
    assert not Path("config.yaml").exists()  # the resolved config goes to the run directory, not the cwd
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["w_bits"] == 6
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"results: {tmp_path / 'run' / 'metrics.json'}"
    assert {"model", "pretrained", "method", "w_bits", "a_bits", "regcache", "metrics", "num_samples"} <= set(result)
    assert {"skipped_samples", "outliers"} <= set(result)
    timings = result["timings_s"]  # where a run's wall time went (what does not shard across ranks)
    assert {"startup", "calibration", "zeroshot_classifiers", "evaluation"} <= set(timings)
    assert all(v >= 0 for v in timings.values())
    assert (result["method"], result["w_bits"], result["a_bits"], result["regcache"]) == ("naive", 6, 6, None)
    metrics = result["metrics"]
    expected = {"colors/zeroshot_top1", "colors/zeroshot_top5", "colors/mean_per_class_recall"}
    expected |= {f"captions/{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert expected <= set(metrics)
    assert all(0.0 <= v <= 1.0 for v in metrics.values() if not math.isnan(v))
    # CLIP_benchmark's convention: no top-k above the classes (3 here), no recall@k above the candidates
    assert math.isnan(metrics["colors/zeroshot_top5"]) and math.isnan(metrics["captions/image_retrieval_recall@10"])
    assert metrics["captions/text_retrieval_recall@10"] == 1.0  # 12 captions, 2 positives per image
    # one CLIP_benchmark result per (dataset, task), the variant in its extra field
    bench = {p.name: json.loads(p.read_text()) for p in (tmp_path / "run" / "clip_benchmark").glob("*.json")}
    assert sorted(bench) == [
        "captions__regcache-tiny-vit_en_zeroshot_retrieval.json",  # {dataset}_{pretrained}_{model}_...
        "colors__regcache-tiny-vit_en_zeroshot_classification.json",
    ]
    colors = bench["colors__regcache-tiny-vit_en_zeroshot_classification.json"]
    assert (colors["dataset"], colors["pretrained"], colors["language"]) == ("wds/colors", "", "en")
    assert colors["metrics"]["acc1"] == metrics["colors/zeroshot_top1"] and math.isnan(colors["metrics"]["acc5"])
    quantization = colors["quantization"]
    assert (quantization["method"], quantization["w_bits"], quantization["regcache"]) == ("naive", 6, None)
    assert quantization["feature_cosine_to_float"] == metrics["colors/feature_cosine_to_float"]
    # the default CSV log: the metrics, the configuration and the run summary as hyper-parameters
    log_dir = tmp_path / "run" / "logs" / "version_0"
    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    logged = {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}
    assert logged["colors/zeroshot_top1"] == pytest.approx(metrics["colors/zeroshot_top1"])
    assert logged["timings_s/evaluation"] == pytest.approx(result["timings_s"]["evaluation"])
    assert logged["num_samples/colors"] == 18
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams["config"]["model"]["w_bits"] == 6 and hparams["config"]["data"]["batch_size"] == 4
    assert hparams["calibration"] == result["calibration"] and hparams["method"] == "naive"
    assert result["num_samples"] == {"colors": 18, "captions": 6}
    assert result["skipped_samples"] == {"colors": 0, "captions": 0}
    assert (tmp_path / "run" / "outliers.png").is_file()
    profile = json.loads((tmp_path / "run" / "outliers.json").read_text())
    for block, stats in profile["after"].items():  # the evaluated pass and the float pass each saw every image
        assert stats["tokens"] == profile["before"][block]["tokens"] == (18 + 6) * 64  # both datasets, CLS skipped
    # the calibration state was saved; a second run reloads it and reproduces every metric
    again = _run(config)
    assert again["metrics"] == pytest.approx(metrics, nan_ok=True)
    assert again["calibration"]["loaded"] and not result["calibration"]["loaded"]
    assert (tmp_path / "run" / "logs" / "version_1" / "metrics.csv").is_file()  # each run logs a version of its own


def test_float_zero_shot_matches_direct_computation(tmp_path, shards):
    """The CLI's zero-shot top-1 equals a direct computation with the same (seeded) model."""
    result = _run(_config(tmp_path, shards, "float"))
    import webdataset as wds

    from regcache.loading import load_model

    torch.manual_seed(0)
    loaded = load_model("regcache-tiny-vit")
    classnames = (shards / "colors" / "classnames.txt").read_text().split()
    with torch.no_grad():
        text = loaded.model.encode_text(loaded.tokenizer([f"a {c} square." for c in classnames]))
        text = torch.nn.functional.normalize(text, dim=-1)
        urls = sorted(str(p) for p in (shards / "colors" / "test").glob("*.tar"))
        correct = total = 0
        for sample in wds.WebDataset(urls, shardshuffle=False).decode("pil"):
            image = loaded.preprocess(sample["png"].convert("RGB"))[None]
            feats = torch.nn.functional.normalize(loaded.model.encode_image(image), dim=-1)
            correct += int((feats @ text.T).argmax() == int(sample["cls"]))
            total += 1
    assert total == 18
    assert result["metrics"]["colors/zeroshot_top1"] == pytest.approx(correct / total)


def test_truncated_shard_fails_the_run_unless_tolerated_then_metrics_record_it(tmp_path, shards):
    import shutil

    from regcache.data import ShardReadError

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    cut = data / "colors" / "test" / "1.tar"  # 5 of the 18 test samples
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    config = _config(tmp_path, data, "float")
    with pytest.raises(ShardReadError, match=rf"{cut}' could not be read.*data\.tolerate_shard_errors"):
        validate_main(["--config", str(config)])
    result = _run(config, "--data.tolerate_shard_errors", "true")
    report = result["shard_errors"]["colors"]
    assert report["shards"] == 1 and report["samples_lost"] is None and list(report["by_shard"]) == [str(cut)]
    read = report["by_shard"][str(cut)]["samples_read"]
    assert read < 5 and result["num_samples"]["colors"] == 13 + read
    assert result["skipped_samples"]["colors"] == 0  # the lost samples are the shard's, not skipped samples
    assert result["shard_errors"]["captions"] == {"shards": 0, "samples_lost": 0, "by_shard": {}}


def test_two_process_run_equals_one_process(tmp_path, shards):
    config = _config(tmp_path, shards, "naive", w_bits=8, a_bits=8)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outs = {}
    for devices in (1, 2):
        run_dir = tmp_path / f"run{devices}"
        cmd = [sys.executable, "-m", "regcache.cli", "validate", "--config", str(config)]
        cmd += [f"--model.run_dir={run_dir}", f"--trainer.devices={devices}"]
        if devices == 2:
            cmd += ["--trainer.strategy=ddp"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip().splitlines()[-1] == f"results: {run_dir / 'metrics.json'}"
        outs[devices] = json.loads((run_dir / "metrics.json").read_text())
        # Lightning started rank 1 itself: the log says how to start the ranks together
        assert ("torchrun --standalone --nproc_per_node 2" in proc.stderr) == (devices == 2)
        assert "sync_dist=True" not in proc.stderr  # the metrics are global already: no advice to sync them
    assert outs[2]["metrics"] == pytest.approx(outs[1]["metrics"], abs=1e-6, nan_ok=True)
    assert outs[2]["num_samples"] == outs[1]["num_samples"]


def test_two_process_register_search_equals_one_process(tmp_path, shards):
    """Configurations split over 2 ranks (rank 0's caches sent on the host) score and choose as 1 process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outs, tables = {}, {}
    for devices in (1, 2):
        config = _regcache_config(tmp_path, shards, f"search{devices}", modes=["both"])
        cmd = [sys.executable, "-m", "regcache.cli", "validate", "--config", str(config)]
        cmd += [f"--trainer.devices={devices}"] + (["--trainer.strategy=ddp"] if devices == 2 else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[devices] = json.loads((tmp_path / f"search{devices}" / "metrics.json").read_text())
        result = json.loads(Path(outs[devices]["regcache"]["result"]).read_text())
        tables[devices] = {r["key"]: r["score"] for r in result["table"]}
        ranks = result["stats"]["ranks"]  # each rank's own share of the grid, timed
        assert len(ranks) == devices and sum(st["tail_runs"] for st in ranks) == len(result["table"])
        slowest = outs[devices]["timings_s"]["register_search.grid.slowest_rank"]
        assert slowest == pytest.approx(max(st["grid_s"] for st in ranks), abs=1e-3)
    assert len(tables[1]) == 1 + 2 * 2 * 2 and tables[2] == pytest.approx(tables[1], abs=1e-9)
    drop = ("search_seconds", "steady_ms_per_config", "result")  # timings and paths differ
    assert {k: v for k, v in outs[2]["regcache"].items() if k not in drop} == {
        k: v for k, v in outs[1]["regcache"].items() if k not in drop
    }
    assert outs[2]["metrics"] == pytest.approx(outs[1]["metrics"], abs=1e-6, nan_ok=True)


def test_compose_defaults(tmp_path):
    (tmp_path / "a.yaml").write_text("model:\n  method: naive\n  w_bits: 8\ntrainer:\n  devices: 1\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\nmodel:\n  w_bits: 6\n")
    assert compose(tmp_path / "b.yaml") == {"model": {"method": "naive", "w_bits": 6}, "trainer": {"devices": 1}}
    (tmp_path / "c.yaml").write_text("defaults: [c.yaml]\n")
    with pytest.raises(ValueError, match="cycle"):
        compose(tmp_path / "c.yaml")


def _regcache_config(tmp_path: Path, shards: Path, run: str, **search_args) -> Path:
    config = yaml.safe_load(_config(tmp_path, shards, "naive", w_bits=6, a_bits=6).read_text())
    config["model"]["run_dir"] = str(tmp_path / run)
    search = {"objective": "acc_ref", "search_images": 6, "sweep_images": 6, "num_candidates": 2}
    search |= {"taus": [1, 3], "delete_ks": [0, 1], "modes": ["both", "prefix", "delete"]}
    search |= {"save_every_s": 0}  # state written after every configuration: the crash below is after row 3
    search |= search_args
    config["trainer"]["callbacks"] = [{"class_path": "callbacks.register_search.RegisterSearch", "init_args": search}]
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_register_search_through_the_cli_resumes_after_interruption(tmp_path, shards, monkeypatch):
    from regcache.registers import search as search_module

    reference = _run(_regcache_config(tmp_path, shards, "uninterrupted"))
    rc = reference["regcache"]
    assert {"l_q", "l_start", "tau", "k_delete", "objective", "search_seconds"} <= set(rc)
    assert 0 <= rc["l_q"] < 6 and rc["objective"] == "acc_ref"
    table = json.loads(Path(rc["result"]).read_text())["table"]
    # base, delete-only k̃=1, prefix-only (2 registers × 2 τ), both with k̃=1 (k̃=0 is prefix-only)
    assert len(table) == 1 + 1 + 2 * 2 + 2 * 2
    assert table[0]["key"] == json.loads(Path(rc["result"]).read_text())["best"]["key"]

    config = _regcache_config(tmp_path, shards, "interrupted")
    original, saves = search_module.RegisterSearch._save_state, []

    def crash_after_three(self, rows):
        original(self, rows)
        saves.append(len(rows))
        if len(saves) == 3:
            raise RuntimeError("simulated preemption")

    monkeypatch.setattr(search_module.RegisterSearch, "_save_state", crash_after_three)
    with pytest.raises(RuntimeError, match="simulated preemption"):
        _run(config)
    monkeypatch.setattr(search_module.RegisterSearch, "_save_state", original)
    resumed = _run(config)
    resumed_result = json.loads(Path(resumed["regcache"]["result"]).read_text())
    assert resumed_result["stats"]["resumed"] == 3
    assert [st["resumed"] for st in resumed_result["stats"]["ranks"]] == [3]  # every rank's stats (one here)
    scores = {r["key"]: r["score"] for r in resumed_result["table"]}
    assert scores == pytest.approx({r["key"]: r["score"] for r in table})
    drop = ("search_seconds", "steady_ms_per_config", "result")  # timings and paths differ
    assert {k: v for k, v in resumed["regcache"].items() if k not in drop} == {
        k: v for k, v in rc.items() if k not in drop
    }
    assert resumed["metrics"] == pytest.approx(reference["metrics"], nan_ok=True)
    # a finished search is reused as is
    again = _run(config)
    assert again["regcache"]["search_seconds"] == resumed["regcache"]["search_seconds"]


def test_register_search_compiles_its_tail_by_default_on_gpus_only():
    from types import SimpleNamespace

    from callbacks.register_search import RegisterSearch

    on = lambda kind: SimpleNamespace(device=torch.device(kind))  # noqa: E731
    assert RegisterSearch()._compile_tail(on("cpu")) is False
    assert RegisterSearch()._compile_tail(on("cuda")) is True
    assert RegisterSearch(compile_tail=False)._compile_tail(on("cuda")) is False
    assert RegisterSearch(compile_tail=True)._compile_tail(on("cpu")) is True


def test_register_search_dtype_through_the_cli(tmp_path, shards):
    from callbacks.register_search import RegisterSearch

    with pytest.raises(ValueError, match=r"search_dtype must be one of \['bfloat16', 'float16', 'float32'\]"):
        RegisterSearch(search_dtype="bf16")
    out = _run(_regcache_config(tmp_path, shards, "bf16", search_dtype="bfloat16", modes=["both"]))
    result = json.loads(Path(out["regcache"]["result"]).read_text())
    assert result["spec"]["dtype"] == "bfloat16" and len(result["table"]) == 1 + 2 * 2 * 2  # base + registers × τ × k̃
    best = max((r for r in result["table"] if r["mode"] == "both"), key=lambda r: r["score"])  # modes: [both]
    assert result["installed"]["key"] == best["key"]
    assert (out["regcache"]["tau"], out["regcache"]["k_delete"]) == (best["tau"], best["delete_k"])
    assert {"register_search.grid", "register_search.gather"} <= set(out["timings_s"])
    parts = [out["timings_s"][f"register_search.grid.{p}"] for p in ("prepare", "configurations")]
    assert sum(parts) <= out["timings_s"]["register_search.grid"] + 0.01  # parts of the grid's time
    assert out["regcache"]["steady_ms_per_config"] > 0


@pytest.mark.parametrize(("method", "depth"), [("float", 0), ("naive", 2)])
def test_validate_prefetches_decoded_batches_for_quantized_models_only(shards, tmp_path, method, depth):
    from datamodules.suite import ValidationSuite
    from regcache._lightning import pl
    from regcache.module import QuantizedEncoder

    suite = ValidationSuite(str(shards), {"colors": {}}, batch_size=6, num_workers=0, decode_on_gpu=True)
    module = QuantizedEncoder("regcache-tiny-vit", method=method, run_dir=str(tmp_path), fidelity=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, limit_val_batches=1)
    trainer.validate(module, datamodule=suite, verbose=False)
    assert suite.modules["colors"].prefetch_depth == depth


def test_profile_step_profiles_the_clis_own_register_search(tmp_path, shards):
    """benchmarks/profile_step.py cli-search runs the CLI, times configurations 2-3 with a sync, profiles 4-5,
    stops the grid there (6 of its 9 rows), and reports the calibration batches the search was given."""
    config = _regcache_config(tmp_path, shards, "profiled", modes=["both"])
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "cli-search", "--start", "2"]
    cmd += ["--configs", "2", "--rows", "5", "--", "validate", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "cli-search: 9 configurations" in out and "calibration batches [(" in out
    assert "ms per configuration (synced, 2 configurations)" in out and "kernel launches per configuration" in out
    assert "Self CPU" in out  # the profiler's table
    (path,) = (tmp_path / "profiled" / "register_search").glob("*/search_result.json")  # one keyed search
    result = json.loads(path.read_text())
    assert len(result["table"]) == 6


def test_run_summary_reaches_every_logger_and_images_the_loggers_that_take_them(tmp_path):
    from PIL import Image

    from regcache._lightning import pl
    from regcache.tracking import log_run_summary

    class ImageLogger(pl.loggers.Logger):
        """A logger with W&B's log_image interface, recording what it is given."""

        name, version = "images", 0

        def __init__(self) -> None:
            super().__init__()
            self.params, self.metrics, self.images = {}, {}, []

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            self.params.update(params)

        def log_metrics(self, metrics, step=None) -> None:
            self.metrics.update(metrics)

        def log_image(self, key, images, step=None, **kwargs) -> None:
            self.images.append((key, images))

    png = tmp_path / "outliers.png"
    Image.new("RGB", (8, 4), (200, 30, 30)).save(png)
    rc = {"l_q": 2, "l_start": 2, "tau": 3, "k_delete": 1, "register": 0, "mode": "both", "objective": "acc_ref"}
    rc |= {"objective_score": 0.5, "base_score": 0.25, "gain_over_base": 0.25, "result": "search_result.json"}
    results = {"timings_s": {"evaluation": 1.5}, "regcache": rc, "calibration": {"state": "c.safetensors"}}
    results |= {"num_samples": {"colors": 18}, "outliers": {"max_l2_after": 3.0, "plot": str(png)}}
    describe = {"model": "m", "method": "naive", "w_bits": 6, "a_bits": 6}
    csv_logger, images = pl.loggers.CSVLogger(tmp_path, name="logs"), ImageLogger()
    missing = tmp_path / "regcache" / "sensitivity.png"
    taken = log_run_summary([csv_logger, images], describe, results, {"outliers": png, "sensitivity": missing})
    assert taken == {"CSVLogger": [], "ImageLogger": ["outliers"]}  # CSV takes no images; absent plots are skipped
    assert images.images == [("outliers", [str(png)])]
    expected = {"regcache/l_q": 2, "regcache/tau": 3, "regcache/k_delete": 1, "regcache/objective_score": 0.5}
    expected |= {"timings_s/evaluation": 1.5, "num_samples/colors": 18, "outliers/max_l2_after": 3.0}
    assert expected.items() <= images.metrics.items()
    assert images.params["regcache"]["objective"] == "acc_ref"
    assert images.params["calibration"] == results["calibration"]
    csv_logger.save()
    hparams = yaml.safe_load((tmp_path / "logs" / "version_0" / "hparams.yaml").read_text())
    assert hparams["regcache"]["tau"] == 3 and hparams["w_bits"] == 6
