#!/usr/bin/env bash
# The W4A4 table of the testbed (README, "W4A4 on the testbed"): naive, RepQ-ViT and QDrop, each without and with
# RegCache, and the sweep's mixed-precision plan, by `regcache validate` on train_configs/demo.yaml's data and grid;
# QDrop + RegCache scores the grid with naive W4A4 and reconstructs once at the winner (the RegisterSearch
# callback's search_method: the library's RegCacheConfig(search_config=...)). Then `regcache report`.
#   bash train_configs/testbed/w4a4_table.sh [RUNS_DIR]        (about 16 minutes on 2 CPU cores, 7.5 of them RepQ-ViT + RegCache)
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-runs/w4a4}
base=(--config train_configs/demo.yaml --config train_configs/bits/w4a4.yaml)
off=(--trainer.callbacks.init_args.enabled=false)
regcache validate "${base[@]}" "${off[@]}" --model.run_dir "$runs/naive"
regcache validate "${base[@]}" --model.run_dir "$runs/naive_regcache"
regcache validate "${base[@]}" "${off[@]}" --model.method repq_vit --model.run_dir "$runs/repq_vit"
regcache validate "${base[@]}" --model.method repq_vit --model.run_dir "$runs/repq_vit_regcache"
regcache validate "${base[@]}" "${off[@]}" --config train_configs/testbed/qdrop.yaml --model.run_dir "$runs/qdrop"
regcache validate "${base[@]}" --config train_configs/testbed/qdrop.yaml \
  --trainer.callbacks.init_args.search_method naive --model.run_dir "$runs/qdrop_regcache"
regcache validate "${base[@]}" "${off[@]}" --config train_configs/testbed/mixed.yaml --model.run_dir "$runs/mixed"
regcache report "$runs"/*/ --out "$runs/w4a4.md"
