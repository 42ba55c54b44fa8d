#!/usr/bin/env bash
# Downloads the peers that the GPU machine lacks (Liger-Kernel, cut-cross-entropy) and leanfit's LoRA dependencies
# (peft, bitsandbytes, pinned as in scripts/constraints.txt) and pytest-xdist (the GPU lane compiles its kernels in
# parallel processes) as Python 3.12 wheels into .whl/,
# which bench/gpu_check.sh installs from. Run here, then name .whl in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1 peft==0.21.2 bitsandbytes==0.50.2 pytest-xdist==3.8.0 \
  execnet==2.1.1
ls -la .whl
