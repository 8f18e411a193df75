"""CLIP_benchmark itself as the oracle: its dataset builder and evaluators against `regcache validate`.

The same checkpoint and the same shards go through CLIP_benchmark 1.6.2's
``build_wds_dataset`` + ``zeroshot_classification.evaluate`` / ``zeroshot_retrieval.evaluate`` and through
``regcache validate``; every number must agree to 1e-4. The quantized model is handed to CLIP_benchmark as
any model with ``encode_image`` / ``encode_text``: the open_clip model with regcache's adapted, naive W8A8
vision tower carrying the calibration state the validate run saved. ``clip_benchmark build`` then
aggregates the run's CLIP_benchmark result files into its CSV.

The model is the embedded testbed (``regcache-testbed``: a 5.7 MB open_clip CLIP, 53.6 % zero-shot top-1 on the
sample): tiny random open_clip CLIPs collapse every image onto nearly one embedding (image-image cosine 0.95-0.999)
and predict one or two classes for all 500 images, with exact logit ties, which would test little.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import tarfile
import types
from pathlib import Path

import pytest
import torch
import yaml

from regcache.lightning_cli import main as validate_main
from regcache.testbed.data import CIFAR10_SAMPLE

MODEL = "regcache-testbed"
BATCH = 50
CAPTION_IMAGES = 40  # > 10: CLIP_benchmark's recall@10 needs at least 10 candidates per query
ORACLE_KEYS = {"acc1": "zeroshot_top1", "acc5": "zeroshot_top5", "mean_per_class_recall": "mean_per_class_recall"}
CLIP_BENCHMARK_INSTALL = "pip install --no-deps clip-benchmark==1.6.2 (the README's test command does it)"

try:
    from clip_benchmark.datasets.builder import build_wds_dataset
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
except ImportError as exc:  # fail, not skip: the oracle is part of the test set-up
    raise ImportError(f"CLIP_benchmark is not installed ({exc}): {CLIP_BENCHMARK_INSTALL}") from exc


def _sample_members() -> dict[str, dict[str, bytes]]:
    """The bundled CIFAR-10 test sample's tar members by sample key."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(CIFAR10_SAMPLE / "test" / "0.tar") as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def _write_shards(out: Path, samples: list[dict], shards: int = 2) -> None:
    """Samples into ``out/test/{0..shards-1}.tar`` + ``nshards.txt`` (CLIP_benchmark's layout)."""
    import webdataset as wds

    (out / "test").mkdir(parents=True)
    for shard in range(shards):
        with wds.TarWriter(str(out / "test" / f"{shard}.tar")) as sink:
            for sample in samples[shard::shards]:
                sink.write(sample)
    (out / "test" / "nshards.txt").write_text(str(shards))


def _write_datasets(root: Path) -> None:
    """Two sets the test writes from CIFAR-10 sample images: ``wds_captions``, retrieval (``.txt`` of one to
    three newline-separated captions, ``dataset_type.txt``), and ``wds_cifar3``, 3 classes with 30 / 20 / 10
    images (fewer classes than top-5's k; unbalanced, so mean per-class recall is not top-1)."""
    classnames = (CIFAR10_SAMPLE / "classnames.txt").read_text().split("\n")
    members = _sample_members()
    keys = sorted(members)
    templates = (CIFAR10_SAMPLE / "zeroshot_classification_templates.txt").read_text().split("\n")
    captions, used = [], {}
    for key in keys[:CAPTION_IMAGES]:
        i, c = int(key[1:]), classnames[int(members[key]["cls"])]
        # captions the testbed's text tower tells apart (it knows the class prompts, not free text), none repeated
        # across images: equal captions score equal, and which ranks first would be the order of the texts and
        # the kernels' rounding, in CLIP_benchmark as in any implementation
        first = used.get(c, 0)
        used[c] = first + 1 + i % 3
        text = [templates[t].format(c=c) for t in range(first, first + 1 + i % 3)]
        captions.append({"__key__": key, "jpg": members[key]["jpg"], "txt": "\n".join(text)})
    _write_shards(root / "wds_captions", captions)
    (root / "wds_captions" / "dataset_type.txt").write_text("retrieval")
    wanted, few = {0: 30, 1: 20, 2: 10}, []
    for key in keys:
        label = int(members[key]["cls"])
        if wanted.get(label, 0) > 0:
            wanted[label] -= 1
            few.append({"__key__": key, "jpg": members[key]["jpg"], "cls": str(label)})
    _write_shards(root / "wds_cifar3", few)
    (root / "wds_cifar3" / "classnames.txt").write_text("\n".join(classnames[:3]))
    (root / "wds_cifar3" / "zeroshot_classification_templates.txt").write_text("\n".join(templates))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """The two datasets the test writes and the float / naive W8A8 validate runs on them and the CIFAR-10 sample."""
    root = tmp_path_factory.mktemp("oracle")
    _write_datasets(root)
    runs = {}
    for method in ("float", "naive"):
        config = {
            "seed_everything": 0,
            "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
            "model": {"model": MODEL, "method": method, "w_bits": 8, "a_bits": 8},
            "data": {
                "root": str(root),
                "datasets": {
                    "cifar10": {"path": str(CIFAR10_SAMPLE), "calib_split": "train", "calib_size": 32},
                    "cifar3": {"path": "wds_cifar3"},
                    "captions": {"path": "wds_captions"},
                },
                "calibration": "cifar10",
                "batch_size": BATCH,
                "num_workers": 0,
            },
        }
        config["model"]["run_dir"] = str(root / method)
        path = root / f"{method}.yaml"
        path.write_text(yaml.safe_dump(config))
        assert validate_main(["--config", str(path)]) == 0
        runs[method] = root / method
    return {"root": root, "runs": runs}


def _oracle_model(setup: dict, method: str):
    """The checkpoint as loaded for CLIP_benchmark, quantized for ``naive`` with the validate run's saved state."""
    from regcache.encoders import adapt
    from regcache.loading import load_model
    from regcache.quant import NaiveConfig, load_quant_state, quantize_

    loaded = load_model(MODEL)
    if method == "naive":
        encoder = adapt(loaded.model)  # replaces model.visual: encode_image runs the quantized tower
        quantize_(encoder, NaiveConfig(w_bits=8, a_bits=8))
        metrics = json.loads((setup["runs"][method] / "metrics.json").read_text())
        load_quant_state(encoder, metrics["calibration"]["state"])
    return loaded.model.eval(), loaded.preprocess, loaded.tokenizer


def _numpy_scalars(accuracy):
    """CLIP_benchmark 1.6.2's ``accuracy()`` calls ``float()`` on a one-element array, which NumPy >= 2.4 refuses;
    run it with ``Tensor.numpy()`` giving 0-d arrays for one-element tensors (its arithmetic unchanged)."""
    numpy = torch.Tensor.numpy

    def compat(*args, **kwargs):
        torch.Tensor.numpy = lambda t, *a, **k: numpy(t.reshape(()) if t.numel() == 1 else t, *a, **k)
        try:
            return accuracy(*args, **kwargs)
        finally:
            torch.Tensor.numpy = numpy

    return compat


@pytest.fixture
def clip_benchmark_numpy(monkeypatch) -> None:
    """The shim above, only where this NumPy needs it."""
    import numpy as np

    try:
        float(np.ones(1))
    except TypeError:
        monkeypatch.setattr(zeroshot_classification, "accuracy", _numpy_scalars(zeroshot_classification.accuracy))


def _loader(dataset):
    # as CLIP_benchmark's CLI builds it for wds/ datasets
    return torch.utils.data.DataLoader(dataset.batched(BATCH), batch_size=None, shuffle=False, num_workers=0)


def _result_file(setup: dict, method: str, dataset: str, task: str) -> dict:
    """The validate run's CLIP_benchmark result for ``dataset`` (``wds/<name>``) and ``task``."""
    files = [json.loads(p.read_text()) for p in (setup["runs"][method] / "clip_benchmark").glob("*.json")]
    found = [f for f in files if (f["dataset"], f["task"]) == (dataset, task)]
    assert len(found) == 1, [(f["dataset"], f["task"]) for f in files]
    # the keys `clip_benchmark eval` writes, plus the variant's extra field
    assert set(found[0]) == {"dataset", "model", "pretrained", "task", "metrics", "language", "quantization"}
    return found[0]


def _same(ours: float, oracle: float) -> bool:
    return (math.isnan(ours) and math.isnan(oracle)) or abs(ours - oracle) <= 1e-4


@pytest.mark.parametrize("method", ["float", "naive"])
@pytest.mark.parametrize("name", ["cifar10", "cifar3"])
def test_zero_shot_classification_equals_clip_benchmark(setup, method, name, single_thread, clip_benchmark_numpy):
    model, transform, tokenizer = _oracle_model(setup, method)
    data_dir = CIFAR10_SAMPLE if name == "cifar10" else setup["root"] / "wds_cifar3"
    dataset = build_wds_dataset(f"wds/{name}", transform, split="test", data_dir=str(data_dir))
    with torch.no_grad():
        oracle = zeroshot_classification.evaluate(
            model, _loader(dataset), tokenizer, dataset.classes, dataset.templates, device="cpu", amp=False
        )
    ours = json.loads((setup["runs"][method] / "metrics.json").read_text())["metrics"]
    got = {key: ours[f"{name}/{ours_key}"] for key, ours_key in ORACLE_KEYS.items()}
    assert all(_same(got[key], oracle[key]) for key in ORACLE_KEYS), (got, oracle)
    written = _result_file(setup, method, f"wds/{name}", "zeroshot_classification")["metrics"]
    assert set(written) == set(oracle) and all(_same(written[k], oracle[k]) for k in oracle), (written, oracle)
    if name == "cifar10":
        assert 0.1 < oracle["acc1"] < 0.9 and oracle["acc1"] < oracle["acc5"] < 1  # a model that ranks
    else:  # CLIP_benchmark's convention for fewer than 5 classes: no top-5
        assert math.isnan(oracle["acc5"]) and oracle["mean_per_class_recall"] != pytest.approx(oracle["acc1"])


@pytest.mark.parametrize("method", ["float", "naive"])
def test_zero_shot_retrieval_equals_clip_benchmark(setup, method, single_thread):
    model, transform, tokenizer = _oracle_model(setup, method)
    dataset = build_wds_dataset("wds/captions", transform, split="test", data_dir=str(setup["root"] / "wds_captions"))
    with torch.no_grad():
        oracle = zeroshot_retrieval.evaluate(
            model, _loader(dataset), tokenizer, device="cpu", amp=False, recall_k_list=[1, 5, 10]
        )
    ours = json.loads((setup["runs"][method] / "metrics.json").read_text())["metrics"]
    for key, value in oracle.items():  # image_retrieval_recall@k (text queries), text_retrieval_recall@k
        assert ours[f"captions/{key}"] == pytest.approx(value, abs=1e-4), key
    written = _result_file(setup, method, "wds/captions", "zeroshot_retrieval")["metrics"]
    assert written == pytest.approx(oracle, abs=1e-4)
    assert len(oracle) == 6 and 0 < oracle["image_retrieval_recall@1"] < oracle["image_retrieval_recall@10"] < 1


@pytest.fixture
def clip_benchmark_cli(monkeypatch) -> types.ModuleType:
    """``clip_benchmark.cli``; where pycocoevalcap (the captioning metrics, left out of the install) is missing,
    empty stand-ins of the modules its captioning import names (``build`` never calls them)."""
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        names = {"tokenizer.ptbtokenizer": "PTBTokenizer", "bleu.bleu": "Bleu", "meteor.meteor": "Meteor"}
        names |= {"rouge.rouge": "Rouge", "cider.cider": "Cider", "spice.spice": "Spice"}
        monkeypatch.setitem(sys.modules, "pycocoevalcap", types.ModuleType("pycocoevalcap"))
        for module, attr in names.items():
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(["pycocoevalcap", *parts[:i]])
                monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
            setattr(sys.modules[f"pycocoevalcap.{module}"], attr, object)
        monkeypatch.delitem(sys.modules, "clip_benchmark.cli", raising=False)
        monkeypatch.delitem(sys.modules, "clip_benchmark.metrics.captioning", raising=False)
    import clip_benchmark.cli

    return clip_benchmark.cli


def test_clip_benchmark_build_aggregates_the_runs_results(setup, clip_benchmark_cli, tmp_path, monkeypatch):
    """`clip_benchmark build` on two runs' result folders: one CSV row per (run, dataset, task), our numbers."""
    out = tmp_path / "benchmark.csv"
    folders = [str(setup["runs"][m] / "clip_benchmark") for m in ("float", "naive")]
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", "build", *folders, "--output", str(out)])
    clip_benchmark_cli.main()
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * 3
    for row in rows:
        quantization = row["quantization"]  # the extra field's column tells float from naive W8A8
        method = "naive" if "'naive'" in quantization else "float"
        metrics = json.loads((setup["runs"][method] / "metrics.json").read_text())["metrics"]
        name = row["dataset"].removeprefix("wds/")
        assert row["model_fullname"] == f"{MODEL} " and row["language"] == "en"
        if row["task"] == "zeroshot_classification":
            assert float(row["acc1"]) == pytest.approx(metrics[f"{name}/zeroshot_top1"])
            assert _same(float(row["acc5"]), metrics[f"{name}/zeroshot_top5"])
        else:
            assert row["task"] == "zeroshot_retrieval" and name == "captions"
            assert float(row["text_retrieval_recall@5"]) == pytest.approx(metrics["captions/text_retrieval_recall@5"])
    assert sorted(r["dataset"] for r in rows) == sorted(["wds/captions", "wds/cifar10", "wds/cifar3"] * 2)
