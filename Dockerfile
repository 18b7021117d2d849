# odtk with its CUDA kernels and TensorRT Engine, on NVIDIA's NGC PyTorch image (which ships CUDA, PyTorch and
# TensorRT with its headers). Not built by odtk's CI (no GPU, no registry access there): see README "GPU / TensorRT".
#   docker build -t odtk .
#   docker run --gpus all --rm -it -v $PWD:/data odtk odtk export /data/model.pth /data/model.plan
ARG BASE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE}

WORKDIR /opt/odtk
COPY setup.py pyproject.toml README.md MANIFEST.in ./
COPY odtk ./odtk
COPY extras ./extras
# Build against the image's torch (no build isolation); ODTK_BUILD_CUDA=1 turns a failed kernel build into an
# error instead of a pure-Python install. TensorRT is found in the image's /usr/include and /usr/lib paths.
ARG TORCH_CUDA_ARCH_LIST="8.0 8.6 8.9 9.0 10.0+PTX"
ENV ODTK_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}
RUN pip install --no-cache-dir --no-build-isolation ".[onnx]" \
 && python -c "import odtk._C as c; assert hasattr(c, 'Engine'), 'odtk._C built without TensorRT'; print('odtk._C with TensorRT', c.tensorrt_version)"
# the C++ example program (OpenCV reads the image)
RUN apt-get update && apt-get install -y --no-install-recommends libopencv-dev && rm -rf /var/lib/apt/lists/* \
 && cmake -S extras/cppapi -B /opt/odtk/build/cppapi -DCMAKE_BUILD_TYPE=Release \
 && cmake --build /opt/odtk/build/cppapi -j \
 && ln -s /opt/odtk/build/cppapi/infer /usr/local/bin/odtk-infer-cpp
WORKDIR /workspace
