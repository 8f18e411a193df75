"""Artifacts keyed by what they depend on, and run directories that refuse another configuration's results."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import DEMO_CONFIG as DEMO
from conftest import DEMO_SMALL as SMALL
from conftest import demo_validate as _validate

from regcache.artifacts import ArtifactStore, artifact_key
from regcache.lightning_cli import main as validate_main


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
    from regcache.registers import SearchPoint

    def spec(tau=1, search_key="k", **timings):
        point = {"l_q": 2, "l_start": 2, "tau": tau, "k_delete": 4, "register": 0, "mode": "both"}
        point |= {"prefix_only_at_lq": False, "search_key": search_key}
        module = SimpleNamespace(
            results={"regcache": {**point, **timings}},
            regcache_point=SearchPoint(0, tau, 4, 2, l_q=2),  # what the register search installed
            model_spec=lambda: {"model": "m", "weights_fingerprint": "f"},
            quant_config=SimpleNamespace(to_dict=lambda: {"method": "naive", "w_bits": 6, "a_bits": 6}),
        )
        trainer = SimpleNamespace(datamodule=SimpleNamespace(calib_selection=lambda: {"dataset": "d", "size": 8}))
        calibration_spec = Calibration().spec(trainer, module)
        assert calibration_spec["regcache"] == point  # the point's fields as metrics.json's regcache names them
        return artifact_key(calibration_spec)

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


def test_metrics_hold_the_run_record_and_the_kernels_actually_used(tmp_path):
    from regcache import kernels
    from regcache.runrecord import file_sha256
    from regcache.testbed import WEIGHTS_PATH

    off = "--trainer.callbacks.init_args.enabled=false"
    before = kernels.current()
    try:
        on = _validate(tmp_path / "sdpa", off)["run_record"]
        explicit = _validate(tmp_path / "explicit", off, "--model.kernels.float_sdpa=false")["run_record"]
    finally:
        kernels.set_kernel_config(before)
    assert on["kernels"]["config"]["float_sdpa"] is True and explicit["kernels"]["config"]["float_sdpa"] is False
    assert {k for k, v in on["kernels"]["config"].items() if explicit["kernels"]["config"][k] != v} == {"float_sdpa"}
    assert on["kernels"]["fallbacks"] == []
    import lightning
    import open_clip
    import timm
    import torch

    versions = on["versions"]
    assert (versions["torch"], versions["timm"]) == (torch.__version__, timm.__version__)
    assert (versions["lightning"], versions["open_clip"]) == (lightning.__version__, open_clip.__version__)
    assert versions["regcache"] is not None
    assert on["checkpoint"]["sha256"] == file_sha256(str(WEIGHTS_PATH)) and on["checkpoint"]["bytes"] > 0
    assert len(on["weights_fingerprint"]) == 16
    assert on["seeds"] == {"seed_everything": 0, "data": 0}
    assert on["devices"] == [on["devices"][0]] and on["devices"][0].startswith("cpu") and on["world_size"] == 1
    calib = on["data"]["cifar10_sample/calib"]
    assert (calib["split"], calib["size"], calib["seed"], calib["drawn"]) == ("train", 128, 0, 128)
    assert calib["shards"][0]["name"] == "train/0.tar" and calib["shards"][0]["bytes"] > 0
    assert on["run_key"] == json.loads((tmp_path / "sdpa" / "run.json").read_text())["key"]
    assert [a["kind"] for a in on["artifacts"]] == ["calibration"]
    assert on["git"] is None or len(on["git"]["commit"]) == 40


def test_a_kernel_fallback_is_recorded_and_a_new_config_clears_it():
    from regcache import kernels

    before = kernels.current()
    try:
        kernels.set_kernel_config(fused_fake_quant=True)
        with pytest.warns(UserWarning, match="fused_fake_quant kernel disabled"):
            kernels.record_fallback("fused_fake_quant", "RuntimeError('no div_rn')")
        assert not kernels.active("fused_fake_quant") and kernels.current().fused_fake_quant
        assert kernels.fallbacks()[-1] == {"kernel": "fused_fake_quant", "reason": "RuntimeError('no div_rn')"}
        assert kernels.record()["fallbacks"][-1]["kernel"] == "fused_fake_quant"
        kernels.set_kernel_config(before)
        assert kernels.active("fused_fake_quant") == before.fused_fake_quant
    finally:
        kernels.set_kernel_config(before)
