#!/usr/bin/env bash
# Compiles odtk._C's CUDA kernels and torch bindings with nvcc (no GPU needed) into build/cuda-check and checks
# that the module exposes its ops; a broken kernel fails here. Skips, saying so, when there is no nvcc.
# Env: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST (default 8.0: one arch keeps it quick),
# PYTHON (default python3), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "cuda-check: skipped: no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
  exit 0
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0} MAX_JOBS=${MAX_JOBS:-2}
echo "cuda-check: nvcc $("$CUDA_HOME/bin/nvcc" --version | grep -o "release [0-9.]*, V[0-9.]*"), TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
out=build/cuda-check
rm -rf "$out" && mkdir -p build   # a clean build: every line below is a real compile
start=$(date +%s)
ODTK_BUILD_CUDA=1 ODTK_BUILD_TENSORRT=0 "$PYTHON" setup.py -q build_ext --build-lib "$out" --build-temp "$out/tmp" \
  > "$out.log" 2>&1 || { grep -m20 -B2 -A6 "error" "$out.log"; echo "cuda-check: FAILED to compile"; exit 1; }
grep "^odtk build:" "$out.log" || true
for src in odtk/csrc/extensions.cpp odtk/csrc/cuda/*.cu; do
  obj=$(find "$out/tmp" -name "$(basename "${src%.*}").o" | head -1)
  [ -n "$obj" ] || { echo "cuda-check: FAILED: no object for $src"; exit 1; }
  echo "cuda-check: compiled $src -> $obj"
done
so=$(find "$out" -maxdepth 2 -name "_C*.so" | head -1)
echo "cuda-check: linked $so ($(( $(date +%s) - start )) s)"
# load it without a GPU and check the ops are there (torch first: it provides libc10/libtorch)
"$PYTHON" - "$so" <<'PY'
import importlib.util, sys
import torch  # noqa: F401
OPS = ("decode", "nms", "decode_rotated", "nms_rotated", "iou_rotated")
spec = importlib.util.spec_from_file_location("odtk._C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
missing = [name for name in OPS if not hasattr(module, name)]
if missing:
    sys.exit(f"cuda-check: FAILED: odtk._C lacks {missing}")
print(f"cuda-check: odtk._C loads and exposes {', '.join(OPS)} (TensorRT: {module.tensorrt_version})")
PY
