"""odtk._C: .plan export/infer wiring (on CPU, with the extension absent or replaced by a recording fake) and the
CUDA decode/NMS kernels against odtk.box's PyTorch/torchvision code (only where a GPU and the built extension are)."""
import json
import os

import pytest
import torch

from odtk import box as box_ops
from odtk import extension
from odtk.export import ExportConfig, batch_profile
from odtk.detector import PlanBackend, Thresholds
from odtk.main import main
from odtk.model import Model, ModelConfig
from odtk.utils import OdtkError

onnx = pytest.importorskip("onnx")

_C = extension.load()[0]
needs_kernels = pytest.mark.skipif(not (torch.cuda.is_available() and _C is not None),
                                   reason="needs a CUDA GPU and odtk._C with the kernels (README: GPU / TensorRT)")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """An untrained MobileNetV2FPN with 3 classes, saved as a checkpoint."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("plan") / "model.pth")
    Model(config=ModelConfig(backbones=["MobileNetV2FPN"], num_classes=3, category_ids=[10, 20, 30])).save(path)
    return path


@pytest.fixture
def no_extension(monkeypatch):
    monkeypatch.setattr(extension, "_loaded", (None, "No module named 'odtk._C'"))


class FakeEngine:
    """Stands in for odtk._C.Engine: records what export passes to build() and writes a recognisable plan."""
    built = {}

    @classmethod
    def build(cls, onnx_bytes, **kwargs):
        cls.built = dict(kwargs, onnx=onnx_bytes)
        engine = cls()
        engine.max_batch, engine.max_detections = kwargs["batch_opts"][2], kwargs["detections"]
        return engine

    def save(self, path):
        with open(path, "wb") as f:
            f.write(b"fake plan")


@pytest.mark.parametrize("argv", [["export", "MODEL", "OUT/model.plan"], ["infer", "OUT/model.plan"]])
def test_plan_without_extension_is_one_line(argv, small_model, tmp_path, caplog, no_extension):
    (tmp_path / "model.plan").write_bytes(b"not built here")    # infer: the file exists, the engine cannot load
    argv = [a.replace("MODEL", small_model).replace("OUT", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "TensorRT engines need odtk's compiled extension, which is missing (No module named 'odtk._C')" in errors[0]
    assert "NGC PyTorch container" in errors[0] and "Traceback" not in caplog.text
    assert (tmp_path / "model.plan").read_bytes() == b"not built here"


def test_plan_with_kernels_only_build(small_model, tmp_path, caplog, monkeypatch):
    kernels_only = type("Module", (), {"decode": None, "nms": None})
    monkeypatch.setattr(extension, "_loaded", (kernels_only, ""))
    assert main(["export", small_model, str(tmp_path / "m.plan")]) == 2
    assert "odtk was built without TensorRT (odtk._C has the CUDA kernels only)" in caplog.text
    assert not (tmp_path / "m.plan").exists()


@pytest.mark.parametrize("flags, precision", [([], "FP16"), (["--full-precision"], "FP32")])
def test_plan_export_passes_the_model_to_the_engine(flags, precision, small_model, tmp_path, monkeypatch):
    monkeypatch.setattr(extension, "engine_class", lambda: FakeEngine)
    out = tmp_path / "sub" / "model.plan"
    assert main(["export", small_model, str(out), "--size", "128", "160", "--dynamic-batch-opts", "1", "2", "4"]
                + flags) == 0
    assert out.read_bytes() == b"fake plan"
    assert [p.name for p in out.parent.iterdir()] == ["model.plan"]       # the temp file was renamed
    built = FakeEngine.built
    model, _ = Model.load(small_model)
    mc = model.config
    assert (built["height"], built["width"]) == (128, 160)
    assert built["strides"] == [8.0, 16.0, 32.0, 64.0, 128.0] == [float(s) for s in model.strides]
    for flat, cell in zip(built["anchors"], model.cell_anchors):
        assert torch.equal(torch.tensor(flat).view(-1, 4), cell)     # what grid_anchors shifts per cell
    assert (built["score_threshold"], built["top_n"], built["nms_threshold"], built["detections"]) == \
        (mc.threshold, mc.top_n, mc.nms, mc.detections)
    assert built["batch_opts"] == [1, 2, 4] and built["fp16"] == (precision == "FP16") and not built["int8"]
    meta = json.loads(built["metadata"])
    assert meta["flavour"] == "plan" and meta["precision"] == precision and meta["category_ids"] == [10, 20, 30]
    assert meta["size"] == [128, 160] and meta["top_n"] == mc.top_n
    graph = onnx.load_from_string(built["onnx"]).graph
    assert [i.name for i in graph.input] == ["input_1"]
    assert [o.name for o in graph.output] == [f"score_{i}" for i in range(1, 6)] + [f"box_{i}" for i in range(1, 6)]
    float_types = {o.type.tensor_type.elem_type for o in list(graph.input) + list(graph.output)}
    assert float_types == {onnx.TensorProto.FLOAT}                 # the engine's I/O stays float32
    conv_weights = {i.data_type for i in graph.initializer if len(i.dims) == 4}
    assert conv_weights == {onnx.TensorProto.FLOAT16 if precision == "FP16" else onnx.TensorProto.FLOAT}


def test_half_raw_heads_match_float(small_model, tmp_path):
    """The FP16 network TensorRT 11 gets (strongly typed) computes the same heads as FP32, within FP16 error."""
    ort = pytest.importorskip("onnxruntime")
    from odtk.export import export_onnx
    model, _ = Model.load(small_model)
    torch.manual_seed(1)
    x = torch.randn(1, 3, 128, 128)
    outputs = {}
    for half in (False, True):
        path = str(tmp_path / f"half{half}.onnx")
        export_onnx(Model.load(small_model)[0], path, size=(128, 128), raw_heads=True, half=half)
        outputs[half] = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input_1": x.numpy()})
    for full, half in zip(outputs[False], outputs[True]):
        assert torch.allclose(torch.from_numpy(half), torch.from_numpy(full), atol=2e-2, rtol=2e-2)
    assert model.config.num_classes == 3


def test_batch_profile():
    cfg = ExportConfig(model="m.pth", output="m.plan", batch=4)
    assert batch_profile(cfg) == (1, 4, 4)
    cfg.dynamic_batch_opts = (2, 4, 8)
    assert batch_profile(cfg) == (2, 4, 8)
    cfg.dynamic_batch_opts = (4, 2, 8)
    with pytest.raises(OdtkError, match="need 0 < MIN <= OPT <= MAX"):
        batch_profile(cfg)


def test_plan_backend_returns_cpu_tensors_and_integer_classes():
    class Engine:
        metadata = '{"category_ids": [1, 2, 3], "mean": [0, 0, 0], "std": [1, 1, 1]}'
        input_size, max_batch = (64, 64), 4

        def infer(self, images):
            b = images.shape[0]
            return torch.ones(b, 100), torch.zeros(b, 100, 4), torch.full((b, 100), 2.0)
    backend = PlanBackend(Engine(), device="cpu")
    scores, boxes, classes = backend(torch.zeros(2, 3, 64, 64), Thresholds())
    assert scores.shape == (2, 100) and boxes.shape == (2, 100, 4)
    assert classes.dtype == torch.long and bool((classes == 2).all())
    assert backend.fit == (64, 64) and backend.max_batch == 4 and backend.category_ids == [1, 2, 3]
    scores, _, _ = backend(torch.zeros(1, 3, 64, 64), Thresholds(detections=10))
    assert scores.shape == (1, 10)


# ---- CUDA kernels vs PyTorch / torchvision (GPU only) ----------------------------------------------------------

def _per_image(batch_idx, scores, boxes, classes, b):
    keep = batch_idx == b
    order = scores[keep].argsort(descending=True)
    return scores[keep][order], boxes[keep][order], classes[keep][order]


def _assert_same(gpu, cpu, what):
    """GPU rows (score > 0) equal the CPU rows: same count and classes, scores and boxes to float rounding
    (the boxes go through expf, which may differ from PyTorch's exp in the last bit)."""
    g_scores, g_boxes, g_classes = gpu
    c_scores, c_boxes, c_classes = cpu
    valid = g_scores > 0
    assert int(valid.sum()) == c_scores.numel(), f"{what}: {int(valid.sum())} kept on GPU, {c_scores.numel()} on CPU"
    torch.testing.assert_close(g_scores[valid].cpu(), c_scores, rtol=1e-6, atol=1e-7)
    assert torch.equal(g_classes[valid].long().cpu(), c_classes.long()), what
    torch.testing.assert_close(g_boxes[valid].cpu(), c_boxes, rtol=1e-5, atol=1e-3)


def _random_heads(batch, anchors, classes, height, width, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, anchors * classes, height, width, generator=g) * 2 - 3
    deltas = torch.randn(batch, anchors * 4, height, width, generator=g) * 0.5
    deltas[:, 2::4] += 6.0     # some dw above BBOX_XFORM_CLIP: the clamp must match
    return logits, deltas


@needs_kernels
@pytest.mark.parametrize("top_n, image_size", [(1000, (100, 140)), (50, None)])
def test_cuda_decode_equals_box_decode(top_n, image_size):
    cell = box_ops.generate_anchors(8, [1.0, 2.0, 0.5], [4, 5.04, 6.35])
    logits, deltas = _random_heads(3, 9, 7, 13, 17, seed=0)
    anchors = box_ops.grid_anchors(cell, 8, 13, 17)
    cpu = box_ops.decode([logits], [deltas], [anchors], threshold=0.05, top_n=top_n, image_size=image_size)
    h, w = image_size or (0, 0)
    gpu = _C.decode(logits.sigmoid().cuda(), deltas.cuda(), cell.cuda(), 8.0, 0.05, top_n, h, w)
    assert gpu[0].shape == (3, top_n) and gpu[1].shape == (3, top_n, 4)
    for b in range(3):
        _assert_same([t[b] for t in gpu], _per_image(*cpu, b), f"image {b}")
        assert bool((gpu[0][b][:-1] >= gpu[0][b][1:]).all()), "GPU scores not sorted"


@needs_kernels
def test_cuda_decode_nothing_above_threshold_is_zero_padded():
    cell = box_ops.generate_anchors(16, [1.0], [4])
    scores = torch.full((2, 3, 5, 5), 0.01, device="cuda")
    out = _C.decode(scores, torch.zeros(2, 4, 5, 5, device="cuda"), cell.cuda(), 16.0, 0.05, 10, 0, 0)
    assert all(bool((t == 0).all()) for t in out)


def _random_candidates(batch, count, classes, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, count, 2, generator=g) * 200
    centres = centres[:, torch.randint(0, count, (count,), generator=g)] + torch.randn(batch, count, 2, generator=g) * 4
    sizes = torch.rand(batch, count, 2, generator=g) * 40 + 8
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=-1)
    scores = torch.rand(batch, count, generator=g) * 0.95 + 0.05
    scores[:, count - count // 5:] = 0         # decode's zero padding
    cls = torch.randint(0, classes, (batch, count), generator=g).float()
    return scores, boxes, cls


@needs_kernels
@pytest.mark.parametrize("count, detections", [(500, 100), (5000, 100), (300, 1000)])
def test_cuda_nms_equals_torchvision(count, detections):
    scores, boxes, classes = _random_candidates(2, count, 5, seed=count)
    valid = scores > 0
    batch_idx = torch.arange(2)[:, None].expand(-1, count)[valid]
    cpu = box_ops.nms(batch_idx, scores[valid], boxes[valid], classes[valid].long(), 2, iou_threshold=0.5,
                      detections=detections)
    gpu = _C.nms(scores.cuda(), boxes.cuda(), classes.cuda(), 0.5, detections)
    for b in range(2):
        n = int((cpu[0][b] > 0).sum())
        assert 0 < n < int(valid[b].sum()), "the test data must make NMS drop boxes"
        _assert_same([t[b] for t in gpu], (cpu[0][b][:n], cpu[1][b][:n], cpu[2][b][:n]), f"image {b}")


@needs_kernels
@pytest.mark.parametrize("backbone, size", [("MobileNetV2FPN", (256, 352)), ("ResNet50FPN", (800, 1344))])
def test_cuda_detect_equals_model_detect_on_model_outputs(backbone, size):
    """decode + NMS of a model's own head outputs (random init, biases set so many anchors pass the threshold)."""
    torch.manual_seed(0)
    model = Model(config=ModelConfig(backbones=[backbone], num_classes=80)).eval()
    torch.nn.init.constant_(model.cls_head[-1].bias, -2.0)
    images = torch.randn(2, 3, *size)
    with torch.inference_mode():
        heads = model.cuda()(images.cuda())
        cpu_heads = ([h.cpu() for h in heads[0]], [h.cpu() for h in heads[1]])
        # the same probabilities on both sides (CPU and CUDA sigmoid may differ in the last bit)
        probs = [h.sigmoid().cuda() for h in cpu_heads[0]]
        mc = model.config
        found = extension.decode(probs, heads[1], model.cell_anchors, model.strides, threshold=mc.threshold,
                                 top_n=mc.top_n, image_size=size, sigmoid=False)
        gpu = extension.nms(*found, iou_threshold=mc.nms, detections=mc.detections)
        cpu = model.cpu().detect(cpu_heads, size)
        on_gpu = extension.detect(model.cuda(), heads, size)    # the logits path: sigmoid on the GPU
    assert gpu[2].dtype == on_gpu[2].dtype == torch.long and on_gpu[0].shape == (2, mc.detections)
    for b in range(2):
        n = int((cpu[0][b] > 0).sum())
        assert n > 0
        _assert_same([t[b] for t in gpu], (cpu[0][b][:n], cpu[1][b][:n], cpu[2][b][:n]), f"{backbone} image {b}")
        assert abs(int((on_gpu[0][b] > 0).sum()) - n) <= 1


@needs_kernels
@pytest.mark.parametrize("top_n", [7, 50, 1000])
def test_cuda_decode_and_nms_order_ties_like_box(top_n):
    """Scores with many exact ties (fp16 probabilities, and a block of equal ones): decode keeps the same candidates
    in the same order as odtk.box (score descending, then flat anchor index), and NMS keeps the same boxes."""
    cell = box_ops.generate_anchors(8, [1.0, 2.0], [4, 6])
    logits, deltas = _random_heads(2, 4, 5, 9, 11, seed=4)
    logits[:, :, 2:6, 3:8] = 0.0                       # probability 0.5 over a block of anchors and classes
    logits = logits.half().float()                      # fp16 logits, as AMP makes them: more ties elsewhere
    probs = logits.sigmoid()                            # on the CPU, as box.decode computes them
    anchors = box_ops.grid_anchors(cell, 8, 9, 11)
    cpu = box_ops.decode([logits], [deltas], [anchors], threshold=0.05, top_n=top_n)
    gpu = _C.decode(probs.cuda(), deltas.cuda(), cell.cuda(), 8.0, 0.05, top_n, 0, 0)
    for b in range(2):
        keep = cpu[0] == b
        n = int(keep.sum())
        assert n == int((gpu[0][b] > 0).sum()) and n > 0
        assert torch.equal(gpu[2][b][:n].long().cpu(), cpu[3][keep]), f"image {b}: classes in another order"
        torch.testing.assert_close(gpu[1][b][:n].cpu(), cpu[2][keep], rtol=1e-5, atol=1e-3)
    valid = gpu[0] > 0
    batch_idx = torch.arange(2, device="cuda")[:, None].expand_as(valid)[valid]
    torch_nms = box_ops.nms(batch_idx.cpu(), gpu[0][valid].cpu(), gpu[1][valid].cpu(), gpu[2][valid].long().cpu(),
                            2, iou_threshold=0.5, detections=100)
    kernel_nms = _C.nms(*gpu, 0.5, 100)
    assert torch.equal(kernel_nms[0].cpu(), torch_nms[0]) and torch.equal(kernel_nms[2].long().cpu(), torch_nms[2])
    torch.testing.assert_close(kernel_nms[1].cpu(), torch_nms[1])


@needs_kernels
def test_model_detect_runs_the_kernels_on_cuda_heads(monkeypatch):
    torch.manual_seed(0)
    model = Model(config=ModelConfig(backbones=["MobileNetV2FPN"], num_classes=5)).eval().cuda()
    torch.nn.init.constant_(model.cls_head[-1].bias, -2.0)
    with torch.inference_mode():
        heads = model(torch.randn(2, 3, 192, 256, device="cuda"))
        reference = model.detect(heads, (192, 256), kernels=False, threshold=0.1, detections=50)
        calls = []
        real = extension.decode
        monkeypatch.setattr(extension, "decode", lambda *a, **k: calls.append(k) or real(*a, **k))
        found = model.detect(heads, (192, 256), threshold=0.1, detections=50)
    assert calls and calls[0]["threshold"] == 0.1 and found[0].shape == (2, 50)
    for b in range(2):
        n = int((reference[0][b] > 0).sum())
        assert n > 0
        _assert_same([t[b] for t in found], [t[b][:n].cpu() for t in reference], f"image {b}")
