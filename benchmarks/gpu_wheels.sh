#!/usr/bin/env bash
# Download, into .whl/, the wheels benchmarks/gpu_check.sh needs that a bare CUDA image (Python 3.12,
# torch, numpy, scipy, opencv, scikit-image present) lacks. Run where pip reaches PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d .whl \
    librosa audioread soxr pooch lazy_loader decorator soundfile face-alignment ffmpeg-python future \
    imageio-ffmpeg python_speech_features fastapi starlette uvicorn websockets python-multipart pydantic \
    pydantic-core annotated-types typing-inspection
du -sh .whl
