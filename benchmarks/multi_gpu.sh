#!/usr/bin/env bash
# Validate (+ register search) at 1, 2, ... GPUs on synthetic ImageNet-sized shards; metrics must match.
#   bash benchmarks/multi_gpu.sh SRC_ROOT "1 2" [copies]
# WARMUP=1 warms the compile caches of every GPU first (see below).
# LAUNCHER=torchrun starts all ranks at once (as torchrun / srun do); the default lets Lightning
# start ranks 1.. as subprocesses of rank 0, which first builds its model (a serial start-up).
# The same check with N CPU processes (gloo) on the bundled testbed and samples, no shards to build:
#   CONFIGS=train_configs/demo.yaml bash benchmarks/multi_gpu.sh builtin "1 2 4"
set -euo pipefail
src=${1:?CLIP_benchmark-layout source root (e.g. the ImageNet one-per-class sample)}
counts=${2:-"1 2"}
copies=${3:-10}
data=${DATA:-/tmp/regcache-bench}  # DATA=...: shards elsewhere (e.g. kept in the checkout between calls)
out=${OUT:-benchmarks/results}
mkdir -p "$out"
[ -n "${APPEND:-}" ] || : > "$out/multi_gpu.jsonl"  # APPEND=1: add to earlier rows (1 GPU in one call, N in the next)
# Python's bytecode cache on, and filled before anything is timed, as on a cluster whose site-packages hold
# compiled bytecode; a host that sets PYTHONDONTWRITEBYTECODE compiles every import from source in every
# process (~3x the start-up: BENCHMARKS.md §5). PYCACHE=off keeps the environment as it is.
if [ "${PYCACHE:-on}" != off ]; then
  unset PYTHONDONTWRITEBYTECODE
  export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/regcache-pycache}
  python3 -c "import regcache.cli, regcache.lightning_cli, callbacks.register_search, datamodules.suite"
fi
if [ "$src" != builtin ] && [ -z "${SKIP_SHARDS:-}" ]; then  # SKIP_SHARDS=1: reuse $data
  python3 benchmarks/make_synthetic_shards.py "$src" "$data/imagenet_synth" --copies "$copies" --shard-size 500
  python3 benchmarks/make_synthetic_shards.py "$src" "$data/imagenet_synth" --copies 1 --out-split train
fi
max_gpus=$(printf '%s\n' $counts | sort -n | tail -1)
for file in ${CONFIGS:-multi_gpu multi_gpu_search}; do
  [ -f "$file" ] || file=benchmarks/configs/$file.yaml
  config=$(basename "$file" .yaml)
  # WARMUP=1: before timing, a cut run of the config on each GPU at once (3 search configurations, 1 validation
  # batch) fills Inductor's caches for every device index: their keys hold the index (cuda:1 misses cuda:0's
  # entries), so a 2-GPU run after a 1-GPU one compiles cold on rank 1 alone and rank 0 waits for it
  if [ -n "${WARMUP:-}" ] && [ "$src" != builtin ]; then
    for ((g = 0; g < max_gpus; g++)); do
      python3 benchmarks/profile_step.py cli-search --start 1 --configs 1 --rows 1 -- validate --config "$file" \
        --model.run_dir=/tmp/regcache-runs/warmup-$config-$g --data.root="$data" "--trainer.devices=[$g]" \
        --trainer.limit_val_batches=1 > "$out/warmup-$config-$g.log" 2>&1 &
    done
    wait
  fi
  for n in $counts; do
    run=/tmp/regcache-runs/$config-$n
    rm -rf "$run"  # a fresh run: resuming an earlier one would not time anything
    start=$(date +%s.%N)
    launch=(python3)
    if [ "${LAUNCHER:-lightning}" = torchrun ] && [ "$n" -gt 1 ]; then
      launch=(env OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} python3 -m torch.distributed.run --standalone --nproc_per_node="$n")
    fi
    "${launch[@]}" -m regcache.cli validate --config "$file" --model.run_dir=$run $([ "$src" != builtin ] && echo --data.root="$data") \
      --trainer.devices=$n $([ "$n" -gt 1 ] && echo --trainer.strategy=ddp) > "$out/$config-$n.log" 2>&1 \
      || { tail -30 "$out/$config-$n.log"; exit 1; }
    end=$(date +%s.%N)
    python3 - "$run/metrics.json" "$config" "$n" "$start" "$end" "${LAUNCHER:-lightning}" >> "$out/multi_gpu.jsonl" <<'PY'
import json, os, sys
m = json.load(open(sys.argv[1]))
# after_metrics_s: from metrics.json's write (the run's last step) to the launcher's exit: teardown not in timings_s
print(json.dumps({"config": sys.argv[2], "launcher": sys.argv[6], "gpus": int(sys.argv[3]), "seconds": float(sys.argv[5]) - float(sys.argv[4]),
                  "after_metrics_s": float(sys.argv[5]) - os.path.getmtime(sys.argv[1]),
                  "metrics": m["metrics"], "num_samples": m["num_samples"], "regcache": m["regcache"],
                  "timings_s": m.get("timings_s", {})}))
PY
  done
done
python3 - "$out/multi_gpu.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| run | launcher | GPUs | wall s | speed-up | metrics equal to 1 GPU | chosen register | search steady ms/config | exit s |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    base = next(b for b in rows if b["config"] == r["config"] and b["gpus"] == 1)
    equal = all(abs(r["metrics"][k] - v) < 1e-6 for k, v in base["metrics"].items()) and r["num_samples"] == base["num_samples"]
    rc = r["regcache"] and {k: r["regcache"][k] for k in ("l_q", "tau", "k_delete", "register")}
    steady = (r["regcache"] or {}).get("steady_ms_per_config")  # rank 0's, per configuration it ran
    print(f"| {r['config']} | {r['launcher']} | {r['gpus']} | {r['seconds']:.1f} | {base['seconds'] / r['seconds']:.2f} | {equal} | {rc} | {steady} | {r.get('after_metrics_s', 0):.1f} |")
phases = sorted({p for r in rows for p in r["timings_s"]})
print()
print("rank 0's seconds per phase (metrics.json timings_s; a.b is a part of a):")
print("rows with more than one GPU add the speed-up over the same config's 1-GPU run in brackets")
print("| phase | " + " | ".join(f"{r['config']} {r['launcher']} {r['gpus']}" for r in rows) + " |")
print("|---|" + "---|" * len(rows))


def cell(r, p):
    t = r["timings_s"].get(p, 0)
    base = next(b for b in rows if b["config"] == r["config"] and b["gpus"] == 1)["timings_s"].get(p, 0)
    return f"{t:.1f} ({base / t:.2f}x)" if r["gpus"] > 1 and t > 0 and base > 0 else f"{t:.1f}"


for p in phases:
    print(f"| {p} | " + " | ".join(cell(r, p) for r in rows) + " |")
PY
