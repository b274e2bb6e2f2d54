#!/usr/bin/env bash
# Collect what bench/multi_gpu.sh needs beyond the GPU image (torch, transformers, peft): trl, datasets,
# accelerate, DeepSpeed (source release + a wheel built here as a fallback) and DeepSpeed's small dependencies.
# Run on a machine with PyPI access, from the repository root; writes .mgwhl/ (git-ignored, about 10 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
W=.mgwhl; mkdir -p $W/prebuilt
PY=${PYTHON:-.venv/bin/python}
DL="$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $W"
for spec in trl==1.16.0 datasets==5.2.0 accelerate==1.15.0 dill==0.4.1 multiprocess==0.70.19 hjson py-cpuinfo \
            msgpack einops ninja pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 \
            typing_inspection==0.4.5 setuptools wheel; do
  $DL "$spec"
done
$PY -m pip download -q --no-deps --no-binary=:all: -d $W deepspeed==0.19.8
DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps --no-build-isolation -w $W/prebuilt $W/deepspeed-0.19.8.tar.gz
du -sh $W; ls $W $W/prebuilt
