#!/usr/bin/env bash
# The single-GPU benchmarks in one go (each prints its table last and writes JSON to $OUT).
#   bash benchmarks/gpu_suite.sh [calibration] [search] [throughput]
set -uo pipefail
export PYTHONUNBUFFERED=1
parts=${*:-"calibration search throughput"}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
for part in $parts; do
  case $part in
    calibration) timeout 300 python3 benchmarks/bench_calibration.py --bits 8 6 ;;
    search) timeout 300 python3 benchmarks/bench_register_search.py ;;
    throughput) timeout 300 python3 benchmarks/bench_eval_throughput.py --methods naive --bits 8 6 ;;
  esac
  echo "== $part exit $?"
done
