"""Artifacts keyed by what they depend on, and run directories that refuse another configuration's results."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from regcache.artifacts import ArtifactStore, artifact_key
from regcache.lightning_cli import main as validate_main

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "train_configs" / "demo.yaml"
SMALL = [  # a 2 × 2 × 2 grid, one evaluation batch, no float pass
    "--trainer.callbacks.init_args.taus=[1,3]",
    "--trainer.callbacks.init_args.delete_ks=[0,3]",
    "--trainer.callbacks.init_args.num_candidates=2",
    "--trainer.limit_val_batches=1",
    "--model.fidelity=false",
]


def _validate(run_dir: Path, *extra: str) -> dict:
    assert validate_main(["--config", str(DEMO), f"--model.run_dir={run_dir}", *SMALL, *extra]) == 0
    return json.loads((run_dir / "metrics.json").read_text())


def _keys(metrics: dict) -> dict[str, tuple[str, bool]]:
    """kind → (key, reused) of the artifacts the run used."""
    return {a["kind"]: (a["key"], a["reused"]) for a in metrics["artifacts"]}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_dir_of_another_method_is_refused_and_left_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    _validate(run)
    before = _snapshot(run)
    argv = ["--config", str(DEMO), f"--model.run_dir={run}", *SMALL, "--model.method=repq_vit"]
    assert validate_main(argv) == 2
    err = capsys.readouterr().err
    stored = json.loads((run / "run.json").read_text())["key"]
    assert f"holds the results of configuration {stored}" in err
    assert 'model.method: "naive" there, "repq_vit" here' in err and "--model.run_dir" in err
    assert _snapshot(run) == before  # config.yaml, metrics.json, artifacts: not one byte changed


def test_runs_differing_only_in_bits_share_no_winner_and_no_calibration(tmp_path):
    store = f"--model.artifacts_dir={tmp_path / 'store'}"
    w6 = _validate(tmp_path / "w6", store)
    w4 = _validate(tmp_path / "w4", store, "--model.w_bits=4", "--model.a_bits=4")
    k6, k4 = _keys(w6), _keys(w4)
    assert k6["register_search"][0] != k4["register_search"][0] and k4["register_search"][1] is False
    assert k6["calibration"][0] != k4["calibration"][0] and k4["calibration"][1] is False
    # each run installed the winner of its own search table, scored at its own bits
    for m in (w6, w4):
        result = json.loads(Path(m["regcache"]["result"]).read_text())
        assert result["key"] == m["regcache"]["search_key"]
        assert result["spec"]["method"]["w_bits"] == m["w_bits"]
        assert m["calibration"]["key"] == _keys(m)["calibration"][0]
    spec = json.loads((tmp_path / "store" / "register_search" / k4["register_search"][0] / "spec.json").read_text())
    assert spec["method"]["w_bits"] == 4 and artifact_key(spec) == k4["register_search"][0]
    assert len(list((tmp_path / "store" / "calibration").iterdir())) == 2  # side by side


def test_data_selection_invalidates_and_the_output_path_does_not(tmp_path):
    store = f"--model.artifacts_dir={tmp_path / 'store'}"
    base = _keys(_validate(tmp_path / "base", store))
    moved = _keys(_validate(tmp_path / "moved", store))  # another output folder: the same artifacts, reused
    assert {k: v[0] for k, v in moved.items()} == {k: v[0] for k, v in base.items()}
    assert all(reused for _, reused in moved.values()) and not any(reused for _, reused in base.values())

    def datasets(**calib):  # data.datasets is one mapping: an override gives all of it
        options = {"calib_split": "train", "calib_size": 128, "ref_split": "train", **calib}
        return "--data.datasets=" + json.dumps({"cifar10_sample": options})

    assert _keys(_validate(tmp_path / "same", store, datasets()))["calibration"] == (base["calibration"][0], True)
    changes = {"size": datasets(calib_size=64), "seed": "--data.seed=1", "split": datasets(calib_split="test")}
    seen = {base["register_search"][0]}
    for name, change in changes.items():
        keys = _keys(_validate(tmp_path / name, store, change))
        assert keys["register_search"][0] not in seen and keys["register_search"][1] is False, name
        assert keys["calibration"][0] != base["calibration"][0] and keys["calibration"][1] is False, name
        seen.add(keys["register_search"][0])


def test_force_recomputes_under_the_same_key(tmp_path):
    store = f"--model.artifacts_dir={tmp_path / 'store'}"
    first = _keys(_validate(tmp_path / "a", store))
    forced = _keys(_validate(tmp_path / "b", store, "--model.force=true"))
    assert {k: v[0] for k, v in forced.items()} == {k: v[0] for k, v in first.items()}
    assert not any(reused for _, reused in forced.values())


def test_the_calibration_key_ignores_timings_and_paths():
    from callbacks.calibration import Calibration

    def spec(**regcache):
        point = {"l_q": 2, "l_start": 2, "tau": 1, "k_delete": 4, "register": 0, "mode": "both", "search_key": "k"}
        module = SimpleNamespace(
            results={"regcache": {**point, **regcache}},
            model_spec=lambda: {"model": "m", "weights_fingerprint": "f"},
            quant_config=SimpleNamespace(to_dict=lambda: {"method": "naive", "w_bits": 6, "a_bits": 6}),
        )
        trainer = SimpleNamespace(datamodule=SimpleNamespace(calib_selection=lambda: {"dataset": "d", "size": 8}))
        return artifact_key(Calibration().spec(trainer, module))

    same = spec(search_seconds=1.0, steady_ms_per_config=2.0, result="/a/search_result.json")
    assert same == spec(search_seconds=9.0, steady_ms_per_config=7.0, result="/b/search_result.json")
    assert same != spec(tau=2) and same != spec(search_key="other")


def test_a_store_reuses_only_the_exact_spec(tmp_path, caplog):
    caplog.set_level("INFO", logger="regcache.artifacts")
    store = ArtifactStore(tmp_path)
    a = store.open("register_search", {"bits": 6}, complete="done")
    assert not a.reused
    a.path("done").parent.mkdir(parents=True)
    a.path("done").write_text("x")
    a.commit()
    assert ArtifactStore(tmp_path).open("register_search", {"bits": 6}, complete="done").reused
    assert f"reusing register search {a.key} from {a.dir}" in caplog.text
    other = ArtifactStore(tmp_path).open("register_search", {"bits": 4}, complete="done")
    assert not other.reused and other.dir != a.dir
    assert not ArtifactStore(tmp_path, force=True).open("register_search", {"bits": 6}, complete="done").reused


@pytest.mark.parametrize("field", ["size", "seed", "split"])
def test_calibration_selection_names_what_changes(field, tmp_path):
    """The datamodule's selection (the keys' data input) changes with each field and holds no absolute path."""
    from datamodules.suite import ValidationSuite
    from regcache.testbed.data import DATA_DIR

    def selection(**over):
        opts = {"calib_split": "train", "calib_size": 16, **over}
        suite = ValidationSuite(root=str(DATA_DIR), datasets={"cifar10_sample": opts}, calibration="cifar10_sample")
        suite.setup()
        return suite.calib_selection()

    base = selection()
    changed = {"size": {"calib_size": 8}, "seed": {"seed": 3}, "split": {"calib_split": "test"}}[field]
    assert artifact_key(selection(**changed)) != artifact_key(base)
    assert str(DATA_DIR) not in json.dumps(base)
    shard = DATA_DIR / "cifar10_sample" / "train" / "0.tar"
    assert base["shards"] == [{"name": "train/0.tar", "bytes": shard.stat().st_size}]
