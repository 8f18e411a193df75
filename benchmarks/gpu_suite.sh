#!/usr/bin/env bash
# The single-GPU benchmarks in one go (each prints its table last and writes JSON to $OUT).
#   bash benchmarks/gpu_suite.sh [calibration] [noisyquant] [search] [throughput] [pipeline] [attention]
# pipeline needs the ImageNet one-per-class sample at .bench/data/imagenet1k_sample (or PIPELINE_ARGS="--src DIR")
set -uo pipefail
export PYTHONUNBUFFERED=1
parts=${*:-"calibration noisyquant search throughput pipeline attention"}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for part in $parts; do
  case $part in
    calibration) timeout 250 python3 benchmarks/bench_calibration.py --bits 8
      # the CLI's TF32 forwards (RegCacheModule(matmul_precision="high")), NoisyQuant being forward-heavy
      timeout 90 python3 benchmarks/bench_calibration.py --methods noisyquant --bits 8 --matmul-precision high ;;
    noisyquant) timeout 120 python3 benchmarks/bench_noisyquant_search.py --precisions fp32 bf16x3 bf16x2 ;;
    search) timeout 290 python3 benchmarks/bench_register_search.py ;;
    pipeline) timeout 300 python3 benchmarks/bench_input_pipeline.py ${PIPELINE_ARGS:-} ;;
    throughput) timeout 280 python3 benchmarks/bench_eval_throughput.py ${THROUGHPUT_ARGS:-} ;;
    attention)  # the fused kernel per activation dtype; float32 with full-float32 and with TF32 products
      for dtype in bfloat16 float32 float32-tf32; do
        OUT=${OUT:-benchmarks/results}/attention_$dtype timeout 100 python3 benchmarks/bench_attention.py --batches 1000 \
          --quantizers "naive uniform8" --no-compile --dtype $dtype | tail -4
      done ;;
  esac
  echo "== $part exit $?"
done
