"""RegisterSearch through `regcache validate` on the demo config: an ablation installs a configuration of its
mode, says how it compares with the base, and `enabled: false` runs the method without RegCache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import demo_validate as _validate


def _table(rc: dict) -> list[dict]:
    return json.loads(Path(rc["result"]).read_text())["table"]


def _check_installed(rc: dict, mode: str) -> None:
    """The installed configuration is the best-scoring row of ``mode`` in the search table, compared with the base."""
    table = _table(rc)
    of_mode = [r for r in table if r["mode"] == mode]
    base = next(r for r in table if r["mode"] == "base")
    best = max(of_mode, key=lambda r: r["score"])
    assert rc["mode"] == mode and rc["objective_score"] == best["score"]
    assert (rc["tau"], rc["k_delete"], rc["register"]) == (best["tau"], best["delete_k"], best["register"])
    assert rc["base_score"] == base["score"]
    assert rc["gain_over_base"] == pytest.approx(best["score"] - base["score"])  # acc_ref: greater is better
    assert rc["best_by_mode"][mode]["score"] == best["score"]
    assert ("warning" in rc) == (rc["gain_over_base"] <= 0)


def test_ablations_through_validate_install_their_modes_configuration(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="callbacks.register_search")
    prefix = _validate(tmp_path / "prefix", "--trainer.callbacks.init_args.modes=[prefix]")["regcache"]
    _check_installed(prefix, "prefix")
    assert prefix["modes"] == ["prefix"] and prefix["k_delete"] == 0 and prefix["tau"] >= 1
    assert prefix["register"] is not None
    assert set(prefix["best_by_mode"]) == {"base", "prefix"}  # the base is scored, to compare with
    if "warning" in prefix:  # a prefix alone can score below the base: installed anyway, and said so
        assert prefix["warning"] in caplog.text

    # one search of every ablation; the single-mode runs (each in its own run directory) then reuse its table
    store = f"--model.artifacts_dir={tmp_path / 'artifacts'}"
    both = _validate(tmp_path / "ablations", store, "--trainer.callbacks.init_args.modes=[prefix,delete,both]")
    assert set(both["regcache"]["best_by_mode"]) == {"base", "prefix", "delete", "both"}
    assert both["regcache"]["mode"] in ("prefix", "delete", "both") and both["regcache"]["reused"] is False
    delete = _validate(tmp_path / "delete", store, "--trainer.callbacks.init_args.modes=[delete]")["regcache"]
    _check_installed(delete, "delete")
    assert delete["tau"] == 0 and delete["register"] is None and delete["k_delete"] == 3
    assert delete["search_key"] == both["regcache"]["search_key"] and delete["reused"] is True  # its table answered
    assert delete["search_seconds"] == both["regcache"]["search_seconds"]
    again = _validate(tmp_path / "prefix2", store, "--trainer.callbacks.init_args.modes=[prefix]")["regcache"]
    _check_installed(again, "prefix")
    assert (again["tau"], again["register"]) == (prefix["tau"], prefix["register"])  # same grid, same winner


def test_a_saved_search_of_other_modes_is_searched_again(tmp_path):
    store = f"--model.artifacts_dir={tmp_path / 'artifacts'}"
    first = _validate(tmp_path / "a", store, "--trainer.callbacks.init_args.modes=[prefix]")["regcache"]
    delete = _validate(tmp_path / "b", store, "--trainer.callbacks.init_args.modes=[delete]")  # not in its table
    _check_installed(delete["regcache"], "delete")
    assert delete["regcache"]["search_key"] != first["search_key"] and delete["regcache"]["reused"] is False
    searches = {a["key"]: a for a in delete["artifacts"] if a["kind"] == "register_search"}
    assert list(searches) == [delete["regcache"]["search_key"]]
    assert sorted(p.name for p in (tmp_path / "artifacts" / "register_search").iterdir()) == sorted(
        [first["search_key"], delete["regcache"]["search_key"]]
    )  # the new search beside the old one


def test_enabled_false_runs_the_method_without_regcache(tmp_path, caplog):
    """The switch: nothing searched or installed (the demo's naive row it equals is checked in test_demo.py)."""
    caplog.set_level(logging.WARNING, logger="callbacks.register_search")
    off = _validate(tmp_path / "off", "--trainer.callbacks.init_args.enabled=false")
    assert off["regcache"] is None and off["method"] == "naive"
    assert not (tmp_path / "off" / "register_search").exists()
    assert "enabled is false" in caplog.text
    assert "register_search" not in off["timings_s"]


def test_default_modes_are_regcache_with_k_tuned_over_zero_too():
    from callbacks.register_search import RegisterSearch

    assert RegisterSearch().modes == ["prefix", "both"]


def test_compare_with_base_says_so_loudly_when_the_base_is_the_result():
    from callbacks.register_search import compare_with_base
    from regcache.registers import SearchResult

    rows = [
        {"key": "base", "mode": "base", "score": 0.5},
        {"key": "p", "mode": "prefix", "score": 0.4},
        {"key": "b", "mode": "both", "score": 0.6},
    ]
    result = SearchResult({}, rows, greater_is_better=True)
    fields, message = compare_with_base(result, result.best_of(["base", "prefix"]), ["base", "prefix"])
    assert fields["warning"] == message and message.startswith("RegCache result is the base")
    fields, message = compare_with_base(result, result.best_of(["prefix"]), ["prefix"])
    assert fields["gain_over_base"] == pytest.approx(-0.1) and "scores no better" in fields["warning"]
    fields, message = compare_with_base(result, result.best_of(["both"]), ["both"])
    assert "warning" not in fields and fields["gain_over_base"] == pytest.approx(0.1)
    assert message.startswith("installed the best both configuration b")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"modes": ["prefix_only"]}, "modes must be a non-empty list of"),
        ({"modes": []}, "modes must be a non-empty list of"),
        ({"modes": ["delete"], "delete_ks": [0]}, "delete_ks must hold a k̃ > 0"),
    ],
)
def test_register_search_rejects_modes_its_grid_cannot_hold(kw, match):
    from callbacks.register_search import RegisterSearch

    with pytest.raises(ValueError, match=match):
        RegisterSearch(**kw)


def test_report_names_an_ablations_modes_and_a_base_result():
    from regcache.report import _regcache

    rc = {"l_q": 2, "tau": 3, "k_delete": 0}
    assert _regcache({"regcache": {**rc, "mode": "prefix", "modes": ["prefix"]}}) == "modes prefix: l_q=2, τ=3, k̃=0"
    assert _regcache({"regcache": {**rc, "mode": "both", "modes": ["prefix", "both"]}}) == "l_q=2, τ=3, k̃=0"
    base = {"l_q": 2, "tau": 0, "k_delete": 0, "mode": "base", "modes": ["base", "prefix"]}
    assert _regcache({"regcache": base}) == "base (nothing installed), l_q=2"
