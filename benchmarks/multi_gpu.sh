#!/usr/bin/env bash
# Validate (+ register search) at 1, 2, ... GPUs on synthetic ImageNet-sized shards; metrics must match.
#   bash benchmarks/multi_gpu.sh SRC_ROOT "1 2" [copies]
# The same check with N CPU processes (gloo) on the bundled testbed and samples, no shards to build:
#   CONFIGS=train_configs/demo.yaml bash benchmarks/multi_gpu.sh builtin "1 2 4"
set -euo pipefail
src=${1:?CLIP_benchmark-layout source root (e.g. the ImageNet one-per-class sample)}
counts=${2:-"1 2"}
copies=${3:-10}
data=/tmp/regcache-bench
out=${OUT:-benchmarks/results}
mkdir -p "$out"
: > "$out/multi_gpu.jsonl"
if [ "$src" != builtin ]; then
  python3 benchmarks/make_synthetic_shards.py "$src" "$data/imagenet_synth" --copies "$copies" --shard-size 500
  python3 benchmarks/make_synthetic_shards.py "$src" "$data/imagenet_synth" --copies 1 --out-split train
fi
for file in ${CONFIGS:-multi_gpu multi_gpu_search}; do
  [ -f "$file" ] || file=benchmarks/configs/$file.yaml
  config=$(basename "$file" .yaml)
  for n in $counts; do
    run=/tmp/regcache-runs/$config-$n
    rm -rf "$run"  # a fresh run: resuming an earlier one would not time anything
    start=$(date +%s.%N)
    python3 -m regcache.cli validate --config "$file" --model.run_dir=$run \
      --trainer.devices=$n $([ "$n" -gt 1 ] && echo --trainer.strategy=ddp) > "$out/$config-$n.log" 2>&1 \
      || { tail -30 "$out/$config-$n.log"; exit 1; }
    end=$(date +%s.%N)
    python3 - "$run/metrics.json" "$config" "$n" "$start" "$end" >> "$out/multi_gpu.jsonl" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(json.dumps({"config": sys.argv[2], "gpus": int(sys.argv[3]), "seconds": float(sys.argv[5]) - float(sys.argv[4]),
                  "metrics": m["metrics"], "num_samples": m["num_samples"], "regcache": m["regcache"]}))
PY
  done
done
python3 - "$out/multi_gpu.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| run | GPUs | wall s | speed-up | metrics equal to 1 GPU | chosen register |")
print("|---|---|---|---|---|---|")
for r in rows:
    base = next(b for b in rows if b["config"] == r["config"] and b["gpus"] == 1)
    equal = all(abs(r["metrics"][k] - v) < 1e-6 for k, v in base["metrics"].items()) and r["num_samples"] == base["num_samples"]
    rc = r["regcache"] and {k: r["regcache"][k] for k in ("l_q", "tau", "k_delete", "register")}
    print(f"| {r['config']} | {r['gpus']} | {r['seconds']:.1f} | {base['seconds'] / r['seconds']:.2f} | {equal} | {rc} |")
PY
