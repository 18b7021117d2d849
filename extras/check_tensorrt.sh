#!/usr/bin/env bash
# Compiles odtk's TensorRT sources (plugins, Engine, the Engine's Python binding, extras/cppapi) with
# -fsyntax-only against TensorRT's public headers, e.g. the include/ folder of github.com/NVIDIA/TensorRT
# (never committed here). No TensorRT libraries or GPU needed. Skips, saying so, without an include path.
# Usage: extras/check_tensorrt.sh TENSORRT_INCLUDE_DIR   (env: CUDA_HOME, default /usr/local/cuda; PYTHON)
set -euo pipefail
cd "$(dirname "$0")/.."
TRT=${1:-${TENSORRT_INCLUDE:-}}
if [ -z "$TRT" ]; then
  echo "tensorrt-check: skipped: no TensorRT include folder given (extras/check_tensorrt.sh PATH/TO/TensorRT/include)"
  exit 0
fi
[ -f "$TRT/NvInferVersion.h" ] || { echo "tensorrt-check: FAILED: $TRT/NvInferVersion.h not found"; exit 1; }
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PYTHON=${PYTHON:-python3}
CXX=${CXX:-g++}
version=$(printf '#include <NvInferVersion.h>\nNV_TENSORRT_MAJOR.NV_TENSORRT_MINOR.NV_TENSORRT_PATCH\n' |
          "$CXX" -E -P -I"$TRT" - | tail -1 | tr -d ' ')
echo "tensorrt-check: TensorRT headers $version from $TRT; $("$CXX" --version | head -1)"
flags=(-fsyntax-only -Wall -Wextra -Werror -DODTK_WITH_TENSORRT -isystem "$TRT" -isystem "$CUDA_HOME/include")
status=0
check() {  # check STD SOURCE [extra flags...]
  local std=$1 src=$2
  shift 2
  if "$CXX" "-std=$std" "${flags[@]}" "$@" "$src"; then echo "tensorrt-check: ok $src ($std)"
  else echo "tensorrt-check: FAILED $src"; status=1; fi
}
for src in odtk/csrc/plugins/*.cpp odtk/csrc/engine.cpp; do check c++17 "$src"; done
# the pybind11 binding of Engine: torch's headers need C++20
mapfile -t torch_flags < <("$PYTHON" - 2>/dev/null <<'PY'
import sysconfig
from torch.utils.cpp_extension import include_paths
for path in include_paths() + [sysconfig.get_paths()["include"]]:
    print("-isystem"); print(path)
PY
)
wheel=$("$PYTHON" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'include'))" 2>/dev/null || true)
[ -d "$wheel" ] && torch_flags+=(-idirafter "$wheel")
check c++20 odtk/csrc/extensions.cpp "${torch_flags[@]}" -DTORCH_EXTENSION_NAME=_C -Wno-unused-parameter
opencv=$(pkg-config --cflags opencv4 2>/dev/null || true)
[ -z "$opencv" ] && [ -f /usr/include/opencv4/opencv2/core.hpp ] && opencv=-I/usr/include/opencv4
if [ -n "$opencv" ]; then
  # shellcheck disable=SC2086
  check c++17 extras/cppapi/infer.cpp -Iodtk/csrc $opencv
else
  echo "tensorrt-check: skipped extras/cppapi/infer.cpp: no OpenCV headers (pkg-config opencv4, /usr/include/opencv4)"
fi
exit $status
