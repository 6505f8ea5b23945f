#!/usr/bin/env bash
# The GPU additions of issues 5 and 6 as one short script for a borrowed CUDA machine:
#
#   bash tools/cuda_checks.sh OUTDIR [BENCH_SECONDS] [REPRODUCE_SECONDS]
#
# 1. tools/benchmark.py on mobilenetv2_100 and resnet18 with --device cuda, float32 then bfloat16 autocast
#    (CUDA events, more repeats than on the CPU), each capped by `timeout`;
# 2. tools/reproduce.py --device cuda: Table 5's suite on all 60 000 Fashion-MNIST images for 10 epochs, 3 seeds,
#    one run at a time with 6 dataloader workers (several mmengine processes sharing one GPU made each SmallNet
#    step take 0.18 s on an H100 in the first try), capped; its result.json files and report go into OUTDIR.
# Needs mdplug importable (PYTHONPATH=repo root), timm, and for step 2 mmengine/mmcv-lite/mmpretrain and the
# Fashion-MNIST IDX files (FASHION_MNIST=dir, default /usr/share/datasets/fashion-mnist).
set -u
out=${1:?usage: tools/cuda_checks.sh OUTDIR [BENCH_SECONDS] [REPRODUCE_SECONDS]}
bench_s=${2:-300}
repro_s=${3:-240}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 1
mkdir -p "$out"
export PYTHONUNBUFFERED=1
start=$(date +%s)
python3 - <<'EOF' 2>&1 | tee "$out/env.txt"
import torch, timm
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)
print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
EOF

bench() {  # dtype seconds
  timeout "$2" python3 tools/benchmark.py --device cuda --dtype "$1" --batch 1 8 32 128 --train-batch 32 128 \
    --warmup 10 --repeats 40 --train-warmup 3 --train-repeats 15 --threads 8 \
    --out "$out/benchmarks_cuda_$1.md" --plot "$out/benchmarks_cuda_$1.png" --json "$out/benchmarks_cuda_$1.json" \
    > "$out/bench_$1.log" 2>&1
  echo "benchmark $1: exit $? after $(( $(date +%s) - start )) s"
}
bench float32 $(( bench_s * 55 / 100 ))
bench bfloat16 $(( bench_s - ($(date +%s) - start) ))
tail -n 40 "$out/benchmarks_cuda_float32.md" 2>/dev/null

data=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
rstart=$(date +%s)
timeout "$repro_s" python3 tools/reproduce.py --device cuda --suite table5 --epochs 10 --train-size 0 \
  --jobs 1 --num-workers 6 --threads 4 --data-root "$data" --work-dir work_dirs/reproduce \
  --docs "$out/results_cuda.md" --plots-dir "$out/results_cuda" > "$out/reproduce.log" 2>&1
echo "reproduce: exit $? after $(( $(date +%s) - rstart )) s"
python3 tools/reproduce.py --device cuda --suite table5 --epochs 10 --train-size 0 --data-root "$data" \
  --work-dir work_dirs/reproduce --docs "$out/results_cuda.md" --plots-dir "$out/results_cuda" --report-only \
  >> "$out/reproduce.log" 2>&1
tar czf "$out/reproduce_cuda_results.tgz" $(find work_dirs/reproduce -name result.json) 2>/dev/null
tail -n 25 "$out/reproduce.log"
echo "total $(( $(date +%s) - start )) s"
