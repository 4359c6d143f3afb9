#!/usr/bin/env bash
# Every GPU-pending figure of BENCHMARKS.md in one run on one CUDA GPU (at most 10 minutes: 600 s of limits),
# written to one report file. Run from the repository root with `.venv` installed:
#
#     bash benchmarks/gpu.sh                      # report: logs/benchmarks/gpu_report.md
#     bash benchmarks/gpu.sh path/to/report.md
#     PYTHON=python3 bash benchmarks/gpu.sh       # another interpreter that holds the dependencies
#
# Each part has its own time limit; a part that fails or runs out of time is recorded as such and the
# script goes on, so that one failure does not cost the others. The exit status is the number of parts
# that failed. Parts, in order of what they settle:
#   1. the GPU-only tests: the training step of each code path on CUDA in bf16 (no tensor made on the host,
#      no host synchronisation), masking kernels, a whole run on one GPU (pinned memory, memory log, CUDA
#      random states), SyncBatchNorm and the gathered losses on CUDA tensors (BENCHMARKS.md, "GPU: what is
#      proven on a CPU");
#   2. step cost of every variant and against open_clip on the same towers (ViT-B/16, bf16, batch 256),
#      with FLOPs, peak memory and the phase breakdown of aclip_eff, and the predicted throughput and
#      memory tables of BENCHMARKS.md with their measured columns filled (benchmarks/prediction.py);
#   3. images/s and MFU, model alone and fed by the real dataloader with worker processes;
#   4. the same with `model.compile=true`;
#   5. data loading on the JPEG fixture, one process per worker (CPU side of the host).
set -uo pipefail

report=${1:-logs/benchmarks/gpu_report.md}
python=${PYTHON:-.venv/bin/python}
workers=${WORKERS:-$(($(nproc) > 2 ? $(nproc) - 2 : 1))}
mkdir -p "$(dirname "$report")"
failures=0

{
  echo "# GPU benchmarks, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- code: \`$(git describe --always --dirty 2>/dev/null || echo unknown)\`"
  echo "- host: $(nproc) CPU cores; dataloader workers: $workers"
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
  echo '```'
} >"$report"

part() {  # part <title> <seconds> <command...>: run it; its printed report (stdout) goes into the report
  local title=$1 limit=$2
  shift 2
  echo "== $title" >&2
  local started=$SECONDS status
  printf '\n## %s\n\n`%s`\n\n' "$title" "$*" >>"$report"
  timeout --signal=INT --kill-after=30 "$limit" "$@" >"$report.out" 2>"$report.err"
  status=$?
  cat "$report.out" >>"$report"
  if ((status != 0)); then
    failures=$((failures + 1))
    printf '\n**failed**: exit %s after %s s (124: over its %s s limit). Last lines of stderr:\n\n```\n' \
      "$status" "$((SECONDS - started))" "$limit" >>"$report"
    tail -n 30 "$report.err" >>"$report"
    echo '```' >>"$report"
  else
    printf '\n(%s s)\n' "$((SECONDS - started))" >>"$report"
  fi
  rm -f "$report.out" "$report.err"
}

# The benchmarks print their report; --no-record keeps BENCHMARKS.md unchanged until the figures are read.
part "GPU tests" 90 "$python" -m pytest -m gpu -q -p no:cacheprovider -rA tests/
part "Step cost, every variant and open_clip, ViT-B/16 bf16 batch 256" 210 \
  "$python" -m benchmarks.step_cost --device cuda --against open_clip --breakdown aclip_eff --no-record
part "Throughput and MFU, fed by $workers workers" 120 \
  "$python" -m benchmarks.throughput --device cuda --variants clip aclip aclip_eff --steps 10 --warmup 3 \
  --loader-workers "$workers" --no-record
part "Throughput with model.compile=true" 120 \
  "$python" -m benchmarks.throughput --device cuda --variants clip aclip_eff --steps 10 --warmup 5 \
  --loader-workers 0 --set model.compile=true --no-record
part "Data loading per worker on the JPEG fixture" 60 \
  "$python" -m benchmarks.loader --sources csv webdataset --rounds 2 --profile none --no-record

echo "report: $report ($failures part(s) failed)" >&2
exit "$failures"
