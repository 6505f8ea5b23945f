#!/usr/bin/env bash
# The GPU checks of issues 5, 6 and 17 as one short script for a borrowed CUDA machine (fits in about 10 min):
#
#   bash tools/cuda_checks.sh OUTDIR [BENCH_SECONDS] [REPRODUCE_SECONDS]
#
# 0. correctness on the GPU of the fused training functions (forced: fuse_training_tail=True; 1×1 and k×k, MDConv
#    and MAConv: output, every gradient and the BN running statistics against plain autograd), that a layer's
#    default on CUDA is plain autograd, and of every compact path against the expanding form in eval mode,
#    float32, at batch 1 and 5, NCHW and channels-last (whose outputs must stay channels-last); mismatches are
#    printed and set the exit status;
# 1. tools/benchmark.py on mobilenetv2_100 with --device cuda, eager, float32 then bfloat16 autocast, inference at
#    batch 1, 32, 128 and training steps at 32 and 128, launch counts beside times; the training rows
#    "(fused)" / "(plain autograd)" decide the CUDA float32 training default (mdplug/nn/_fused.py DEVICES);
# 2. the same compiled (--torchcompile inductor --compile-mode reduce-overhead: CUDA graphs), float32 and bfloat16,
#    static / MAConv / MDConv only (compiling every variant would not fit);
# 3. only with REPRODUCE_SECONDS > 0 (default 0): tools/reproduce.py --device cuda, Table 5's suite on all 60 000
#    Fashion-MNIST images for 10 epochs, 3 seeds, one run at a time with 6 dataloader workers, capped.
# Every step is capped by `timeout` (BENCH_SECONDS, default 420, split between the four benchmark runs). Reports
# go to OUTDIR/benchmarks_cuda_{float32,bfloat16}{,_compiled}.md (+ .json, .png); commit them as
# docs/benchmarks_cuda_*.md with the GPU and the date (the reports carry both).
# Needs mdplug importable (PYTHONPATH=repo root), timm, and for step 3 mmengine/mmcv-lite/mmpretrain and the
# Fashion-MNIST IDX files (FASHION_MNIST=dir, default /usr/share/datasets/fashion-mnist).
set -u
out=${1:?usage: tools/cuda_checks.sh OUTDIR [BENCH_SECONDS] [REPRODUCE_SECONDS]}
bench_s=${2:-420}
repro_s=${3:-0}
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
        plain = copy.deepcopy(fused)
        if plain._use_fused_tail():  # the default on CUDA: plain autograd (fuse_training_tail=None)
            print(f'default {cls.__name__}: fused on CUDA', 'MISMATCH'); bad += 1
        fused.fuse_training_tail, plain.fuse_training_tail = True, False
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

bench() {  # name seconds extra-args...
  local name=$1 secs=$2; shift 2
  timeout "$secs" python3 tools/benchmark.py --device cuda --model mobilenetv2_100 --batch 1 32 128 \
    --train-batch 32 128 --warmup 10 --repeats 40 --train-warmup 3 --train-repeats 15 --threads 8 "$@" \
    --out "$out/benchmarks_cuda_$name.md" --plot "$out/benchmarks_cuda_$name.png" \
    --json "$out/benchmarks_cuda_$name.json" > "$out/bench_$name.log" 2>&1
  echo "benchmark $name: exit $? after $(( $(date +%s) - start )) s"
}
tv=(--train-variants static 'maconv expanding' 'mdconv expanding' 'maconv expanding (fused)' 'mdconv expanding (fused)'
    'maconv expanding (plain autograd)' 'mdconv expanding (plain autograd)')
bench float32 $(( bench_s * 30 / 100 )) "${tv[@]}"
bench bfloat16 $(( bench_s * 20 / 100 )) --dtype bfloat16 "${tv[@]}"
compiled=(--torchcompile inductor --compile-mode reduce-overhead --warmup 3 --train-warmup 3
          --variants static 'maconv compact' 'mdconv compact (auto)'
          --train-variants static 'maconv expanding' 'mdconv expanding')
bench float32_compiled $(( bench_s * 30 / 100 )) "${compiled[@]}"
bench bfloat16_compiled $(( bench_s - ($(date +%s) - start) )) --dtype bfloat16 "${compiled[@]}"
for f in float32 bfloat16 float32_compiled bfloat16_compiled; do
  grep -A 12 -E '^### (Inference|Training step)' "$out/benchmarks_cuda_$f.md" 2>/dev/null | head -n 60
done

if [ "$repro_s" -le 0 ]; then
  echo "reproduce: skipped (REPRODUCE_SECONDS=0); total $(( $(date +%s) - start )) s"
  exit 0
fi
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
