"""`regcache demo` on the committed testbed (reduced grid): rows, JSON keys and the RegCache effect."""

from __future__ import annotations

import json

from regcache.demo import run_demo


def test_demo_rows_and_regcache_recovers_naive_w6a6(tmp_path):
    path = run_demo(tmp_path, strong_method=None, progress=False, taus=(1, 3), delete_ks=(0, 3), num_candidates=2)
    result = json.loads(path.read_text())
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
    assert rows["naive W6A6 + delete only"]["regcache"]["tau"] == 0
    assert (tmp_path / "results.md").is_file() and (tmp_path / "norm_profile.png").is_file()
