"""odtk: a pure-Python package, plus the optional extension odtk._C (CUDA decode/NMS kernels and, with TensorRT,
the Engine and its plugins). The extension is built only when it can be: see README "GPU / TensorRT"."""
import glob
import os
import sys
from typing import List, Optional, Tuple

from setuptools import find_packages, setup

CSRC = os.path.join("odtk", "csrc")
OFF = ("0", "no", "off", "false")
ON = ("1", "yes", "on", "true")


def report(line: str) -> None:
    print(f"odtk build: {line}", file=sys.stderr)


def wheel_cuda_include() -> Optional[str]:
    """The CUDA library headers (cuBLAS, cuSPARSE...) that torch's headers include, shipped by torch's CUDA 13
    wheel dependencies; a bare CUDA toolkit install may lack them."""
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        path = os.path.join(root, "cu13", "include")
        if os.path.isfile(os.path.join(path, "cublas_v2.h")):
            return path
    return None


def find_tensorrt() -> Tuple[Optional[Tuple[str, str]], str]:
    """(include dir, library dir) of TensorRT with its ONNX parser, or None and why not."""
    if os.environ.get("ODTK_BUILD_TENSORRT", "").lower() in OFF:
        return None, "ODTK_BUILD_TENSORRT=0"
    candidates = []
    if os.environ.get("TENSORRT_DIR"):
        root = os.environ["TENSORRT_DIR"]
        candidates.append((os.path.join(root, "include"), os.path.join(root, "lib")))
    for triple in ("x86_64-linux-gnu", "aarch64-linux-gnu"):   # NGC containers / Debian packages
        candidates.append((f"/usr/include/{triple}", f"/usr/lib/{triple}"))
    for include, lib in candidates:
        headers = all(os.path.isfile(os.path.join(include, h)) for h in ("NvInfer.h", "NvOnnxParser.h"))
        libs = all(glob.glob(os.path.join(lib, f"lib{name}.so*")) for name in ("nvinfer", "nvonnxparser"))
        if headers and libs:
            return (include, lib), f"headers {include}, libraries {lib}"
    where = "TENSORRT_DIR" if os.environ.get("TENSORRT_DIR") else "TENSORRT_DIR unset and no NGC paths"
    return None, f"NvInfer.h/NvOnnxParser.h and libnvinfer/libnvonnxparser not found ({where})"


def extensions() -> Tuple[List, dict]:
    """ext_modules and cmdclass for odtk._C, or none; prints what is included and why."""
    mode = os.environ.get("ODTK_BUILD_CUDA", "").lower()
    required = mode in ON
    reason = None
    if mode in OFF:
        reason = "ODTK_BUILD_CUDA=0"
    elif not required and not os.environ.get("CUDA_HOME"):
        reason = "CUDA_HOME is not set (set it, or ODTK_BUILD_CUDA=1, to build the kernels)"
    if reason is None:
        try:
            import torch
            from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
        except ImportError:
            reason = "torch is not importable at build time (pip install --no-build-isolation)"
        else:
            if CUDA_HOME is None or torch.version.cuda is None:
                reason = f"no nvcc found (CUDA_HOME {CUDA_HOME}) or a CPU-only torch (torch.version.cuda None)"
    if reason is not None:
        if required:
            sys.exit(f"odtk build: ODTK_BUILD_CUDA=1 but {reason}")
        report(f"CUDA kernels: no ({reason}); pure-Python install")
        report("TensorRT Engine and plugins: no (they need the CUDA kernels)")
        return [], {}

    sources = [os.path.join(CSRC, "extensions.cpp"), *sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))]
    # our sources are C++17; the language standard is left to torch (2.14's headers need C++20)
    cxx = ["-O3"]
    nvcc = ["-O3"]
    include = wheel_cuda_include()
    if include:
        cxx += ["-idirafter", include]
    define_macros, libraries, library_dirs, include_dirs = [], [], [], [os.path.abspath(CSRC)]
    trt, where = find_tensorrt()
    if trt:
        sources += [os.path.join(CSRC, "engine.cpp"), *sorted(glob.glob(os.path.join(CSRC, "plugins", "*.cpp")))]
        include_dirs.append(trt[0])
        library_dirs.append(trt[1])
        libraries += ["nvinfer", "nvonnxparser"]
        define_macros.append(("ODTK_WITH_TENSORRT", None))
        cxx.append("-Wno-deprecated-declarations")   # TensorRT's headers keep their deprecated IPluginV2 API
    report(f"CUDA kernels: yes (nvcc {CUDA_HOME}, TORCH_CUDA_ARCH_LIST "
           f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'torch default')})")
    report(f"TensorRT Engine and plugins: {'yes' if trt else 'no'} ({where})")
    ext = CUDAExtension("odtk._C", sources, include_dirs=include_dirs, define_macros=define_macros,
                        libraries=libraries, library_dirs=library_dirs,
                        runtime_library_dirs=library_dirs if trt and os.environ.get("TENSORRT_DIR") else [],
                        extra_compile_args={"cxx": cxx, "nvcc": nvcc})
    return [ext], {"build_ext": BuildExtension}


def version() -> str:
    """odtk/version.py's __version__, without importing odtk (its dependencies may not be installed yet)."""
    scope: dict = {}
    with open(os.path.join("odtk", "version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


ext_modules, cmdclass = extensions()

setup(
    name="odtk",
    version=version(),
    description="RetinaNet object detection toolkit: train, infer, evaluate and export on CPU or GPU",
    packages=find_packages(include=["odtk", "odtk.*"]),
    package_data={"odtk": ["py.typed"]},   # PEP 561: odtk's type hints are for type checkers too
    python_requires=">=3.9",
    # torch 2.6: checkpoints load with torch.load(weights_only=True) inside torch.serialization.safe_globals, whose
    # (object, "module.name") entries (pytorch#142153) read numpy < 2.1's RNG state under numpy 2; it also has
    # torch.amp.GradScaler("cuda") (2.3) and torch.onnx.export(dynamo=False) (2.5). torchvision 0.21 is the
    # release built for torch 2.6 (decode_image(apply_exif_orientation=True) dates from 0.19).
    install_requires=["torch>=2.6", "torchvision>=0.21", "pycocotools", "pillow", "numpy", "tqdm", "requests",
                      "tensorboardX"],
    extras_require={
        # shapely: tests/test_rotated.py checks the rotated IoU against its polygon intersection
        "test": ["pytest", "onnx", "onnxruntime", "onnxscript", "nvidia-dali-cuda130", "matplotlib>=3.6", "av",
                 "shapely"],
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        "dali": ["nvidia-dali-cuda130"],
        "plots": ["matplotlib>=3.6"],   # odtk.plots: Figure(layout=...) and Axes.bar_label
        "video": ["av"],   # odtk infer/Detector on video files (PyAV: FFmpeg decode, H.264 encode)
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["odtk=odtk.main:main"]},
)
