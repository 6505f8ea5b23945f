#!/usr/bin/env bash
# The GPU additions of issues 5 and 6 as one short script for a borrowed CUDA machine:
#
#   bash tools/cuda_checks.sh OUTDIR [BENCH_SECONDS] [REPRODUCE_SECONDS]
#
# 0. correctness on the GPU of the fused training functions (1×1 and k×k, MDConv and MAConv: output, every
#    gradient and the BN running statistics against plain autograd) and of every compact path against the
#    expanding form in eval mode, float32, at batch 1 and 5, NCHW and channels-last (whose outputs must stay
#    channels-last); mismatches are printed and set the exit status;
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

python3 - <<'EOF' 2>&1 | tee "$out/cuda_correctness.txt"
import copy, sys, torch
from mdplug import MAConv2d, MDConv2d, DCDConv2d
dev, bad = 'cuda', 0
CL = torch.channels_last
def nhwc(t):
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()
def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
def randomize(layer):
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5); m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.3); m.running_var.uniform_(0.5, 2.0)
    return layer
torch.manual_seed(0)
for cls in (MDConv2d, MAConv2d):
    for k, s, p, q in ((1, 1, 16, 40), (1, 2, 16, 40), (1, 1, 24, 40), (1, 1, 40, 24), (3, 1, 24, 40),
                       (3, 2, 24, 40)):
      for fmt in (torch.contiguous_format, CL):
        fused = randomize(cls(p, q, k, s, k // 2, m=8)).to(dev).train()
        plain = copy.deepcopy(fused); plain.fuse_training_tail = False
        x = torch.randn(6, p, 15, 15, device=dev).contiguous(memory_format=fmt)
        xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        yf, yp = fused(xf), plain(xp)
        g = torch.randn_like(yp); yf.backward(g); yp.backward(g)
        errs = [rel(yf, yp), rel(xf.grad, xp.grad)]
        errs += [rel(a.grad, b.grad) for a, b in zip(fused.parameters(), plain.parameters())]
        errs += [rel(a.float(), b.float()) for a, b in zip(fused.buffers(), plain.buffers())]
        ok = max(errs) < 1e-4 and (fmt is not CL or nhwc(yf)); bad += not ok
        print(f'train {cls.__name__} {p}->{q} k={k} s={s} {fmt}: max rel err {max(errs):.2e}', 'OK' if ok else 'MISMATCH')
for cls in (MDConv2d, DCDConv2d):
    for k, p, q in ((1, 24, 40), (1, 40, 24), (3, 24, 40)):
        layer = randomize(cls(p, q, k, 1, k // 2, m=8)).to(dev).eval()
        comp = layer.fuse()
        for b in (1, 5):
            x = torch.randn(b, p, 15, 15, device=dev)
            with torch.no_grad():
                want = layer(x)
                for path in ('weight', 'factorized', 'auto'):
                    comp.path = path
                    for fmt in (torch.contiguous_format, CL):
                        y = comp(x.contiguous(memory_format=fmt))
                        e = rel(y, want); ok = e < 1e-4 and (fmt is not CL or nhwc(y)); bad += not ok
                        print(f'compact {cls.__name__} {p}->{q} k={k} batch {b} {path} {fmt}: rel err {e:.2e}',
                              'OK' if ok else 'MISMATCH')
sys.exit(1 if bad else 0)
EOF
echo "correctness: exit ${PIPESTATUS[0]}"

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
