#!/usr/bin/env bash
# Download the wheels scripts/gpu_checks.sh installs on the lent GPU machine (its image has torch, transformers and
# lightning, not hydra/omegaconf): hydra-core, omegaconf, antlr4 (built here: PyPI has only its sdist), the
# transformers version the tests here use (the image's may be older), and the reference package memoria-pytorch
# 1.1.0 for the benchmark. They go to .whl/ (git-ignored), which the call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PLATFORM="--python-version 3.12 --implementation cp --platform manylinux2014_x86_64 --platform any"
for package in hydra-core==1.3.8 omegaconf==2.3.1 transformers==5.24.0 memoria-pytorch==1.1.0; do
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: $PLATFORM -d .whl "$package"
done
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls .whl
