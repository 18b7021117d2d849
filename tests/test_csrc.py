"""odtk._C: .plan export/infer wiring (on CPU, with the extension absent or replaced by a recording fake) and the
CUDA decode/NMS kernels against odtk.box's PyTorch/torchvision code (only where a GPU and the built extension are)."""
import json
import os

import pytest
import torch

from odtk import box as box_ops
from odtk import extension
from odtk.export import ExportConfig, batch_profile, size_profile
from odtk.detector import Detector, PlanBackend, Thresholds
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
    assert built["size_opts"] == [[128, 160]] * 3 and built["dynamic_size"] is False
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


class FakeRunEngine:
    """Stands in for a loaded odtk._C.Engine: records each batch it is given and finds one box per image, at
    (1, 2, 11, 12) in input pixels, class 2."""
    metadata = '{"category_ids": [1, 2, 3], "mean": [0, 0, 0], "std": [1, 1, 1], "resize": 96, "max_size": 160}'
    input_size, max_batch, dynamic_size = (64, 64), 4, False

    def __init__(self, profile=((64, 64),) * 3):
        self.size_profile = [list(size) for size in profile]
        self.dynamic_size = profile[0] != profile[2]
        self.batches = []

    def infer(self, images):
        self.batches.append(tuple(images.shape))
        b = images.shape[0]
        scores = torch.zeros(b, 100)
        scores[:, 0] = 0.9
        boxes = torch.zeros(b, 100, 4)
        boxes[:, 0] = torch.tensor([1.0, 2.0, 11.0, 12.0])
        return scores, boxes, torch.full((b, 100), 2.0)


def test_plan_backend_returns_cpu_tensors_and_integer_classes():
    backend = PlanBackend(FakeRunEngine(), device="cpu")
    scores, boxes, classes = backend(torch.zeros(2, 3, 64, 64), Thresholds())
    assert scores.shape == (2, 100) and boxes.shape == (2, 100, 4)
    assert classes.dtype == torch.long and bool((classes == 2).all())
    assert backend.fit == (64, 64) and backend.max_batch == 4 and backend.category_ids == [1, 2, 3]
    assert not backend.dynamic and not backend.group_shapes
    scores, _, _ = backend(torch.zeros(1, 3, 64, 64), Thresholds(detections=10))
    assert scores.shape == (1, 10)


def test_dynamic_plan_backend_pads_to_the_profile_and_refuses_larger():
    engine = FakeRunEngine(((64, 64), (96, 160), (160, 160)))
    backend = PlanBackend(engine, device="cpu")
    assert backend.dynamic and backend.fit is None and backend.group_shapes
    assert (backend.resize, backend.max_size) == (96, 160)            # the plan's metadata, as a dynamic ONNX
    backend(torch.ones(2, 3, 32, 96), Thresholds())
    backend(torch.ones(1, 3, 128, 160), Thresholds())
    assert engine.batches == [(2, 3, 64, 96), (1, 3, 128, 160)]      # padded up to min, otherwise as given
    with pytest.raises(OdtkError, match="a 192x160 batch is larger than this engine's largest input, 160x160: "
                                        "infer with --max-size 160 or less"):
        backend(torch.zeros(1, 3, 192, 160), Thresholds())


def test_dynamic_plan_detector_resizes_like_pth_and_batches_by_orientation():
    """Images resized as a .pth resizes them (shorter side to the plan's resize, longer capped by max_size), padded
    to the stride, landscape and portrait in separate engine calls; boxes back in each image's own pixels."""
    engine = FakeRunEngine(((64, 64), (96, 160), (160, 160)))
    detector = Detector(PlanBackend(engine, device="cpu"))
    images = [torch.zeros(3, 60, 80, dtype=torch.uint8), torch.zeros(3, 80, 40, dtype=torch.uint8),
              torch.zeros(3, 30, 40, dtype=torch.uint8), torch.zeros(3, 50, 50, dtype=torch.uint8)]
    found = detector.predict(images, batch_size=4)
    # landscape/square: 96x128 (60x80 x1.6), 96x128 (30x40 x3.2), 96x96 -> padded batch 96x128; portrait:
    # 80x40 x2 = 160x80 (max_size caps the longer side) -> 160x96 (multiples of 32)
    assert engine.batches == [(3, 3, 96, 128), (1, 3, 160, 96)]
    assert [f.image_size for f in found] == [(60, 80), (80, 40), (30, 40), (50, 50)]   # input order kept
    ratios = [1.6, 2.0, 3.2, 96 / 50]
    for f, r in zip(found, ratios):
        assert f.labels.tolist() == [3]
        torch.testing.assert_close(f.boxes, torch.tensor([[1.0, 2.0, 11.0, 12.0]]) / r)


def test_size_profile_default_and_checks():
    cfg = ExportConfig(model="m.pth", output="m.plan", dynamic_size=True)
    # from one stride up to the padded max_size square, tuned for a landscape image at the resize
    assert size_profile(cfg, 32, (800, 1333)) == ((32, 32), (800, 1344), (1344, 1344))
    assert size_profile(cfg, 128, (600, 1000)) == ((128, 128), (640, 1024), (1024, 1024))
    assert size_profile(cfg, 32, (900, 640)) == ((32, 32), (640, 640), (640, 640))    # resize above max_size
    cfg = ExportConfig(model="m.pth", output="m.plan", dynamic_size=True,
                       dynamic_size_opts=("128", "512x768", (768, 1024)))
    assert cfg.dynamic_size_opts == ((128, 128), (512, 768), (768, 1024))
    assert size_profile(cfg, 128, (800, 1333)) == cfg.dynamic_size_opts
    with pytest.raises(OdtkError, match="each side must be a multiple of 256"):
        size_profile(cfg, 256, (800, 1333))


@pytest.mark.parametrize("flags, message", [
    (["--dynamic-size", "--dynamic-size-opts", "64", "big", "256"],
     "--dynamic-size-opts 64 big 256: give three sizes MIN OPT MAX, each a side (square) or HEIGHTxWIDTH"),
    (["--dynamic-size", "--dynamic-size-opts", "64", "128x", "256"], "give three sizes MIN OPT MAX"),
    (["--dynamic-size", "--dynamic-size-opts", "64", "0", "256"],
     "--dynamic-size-opts 64 0 256: sizes must be positive"),
    (["--dynamic-size", "--dynamic-size-opts", "64", "256x96", "128"],
     "--dynamic-size-opts 64 256x96 128: need MIN <= OPT <= MAX in height and in width"),
    (["--dynamic-size", "--dynamic-size-opts", "64", "100", "256"],
     "--dynamic-size-opts 64x64 100x100 256x256: each side must be a multiple of 32"),
    (["--dynamic-size-opts", "64", "128", "256"], "--dynamic-size-opts sets the input sizes a --dynamic-size plan"),
])
def test_bad_dynamic_size_opts_are_one_line(flags, message, small_model, tmp_path, caplog, capsys, monkeypatch):
    monkeypatch.setattr(extension, "engine_class", lambda: FakeEngine)
    caplog.clear()
    assert main(["export", small_model, str(tmp_path / "m.plan")] + flags) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and message in errors[0], errors
    assert "Traceback" not in caplog.text + "".join(capsys.readouterr())
    assert not os.listdir(tmp_path)


def test_dynamic_size_opts_on_onnx_is_refused(small_model, tmp_path, caplog):
    argv = ["export", small_model, str(tmp_path / "m.onnx"), "--dynamic-size", "--dynamic-size-opts", "64", "96",
            "128"]
    assert main(argv) == 2
    assert "m.onnx: --dynamic-size-opts is a TensorRT (.plan) profile" in caplog.text and not os.listdir(tmp_path)


def test_dynamic_plan_export_builds_a_profile_from_a_symbolic_onnx(small_model, tmp_path, monkeypatch):
    monkeypatch.setattr(extension, "engine_class", lambda: FakeEngine)
    out = tmp_path / "dynamic.plan"
    assert main(["export", small_model, str(out), "--dynamic-size", "--dynamic-size-opts", "64", "96x128", "256",
                 "--resize", "96", "--max-size", "256", "--dynamic-batch-opts", "1", "2", "4"]) == 0
    built = FakeEngine.built
    assert built["dynamic_size"] is True and built["size_opts"] == [[64, 64], [96, 128], [256, 256]]
    assert built["batch_opts"] == [1, 2, 4]
    meta = json.loads(built["metadata"])
    assert meta["dynamic"] is True and (meta["resize"], meta["max_size"]) == (96, 256)
    assert meta["size"] == [96, 128] and meta["flavour"] == "plan"    # traced at the profile's opt
    graph = onnx.load_from_string(built["onnx"]).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert [o.name for o in graph.output] == [f"score_{i}" for i in range(1, 6)] + [f"box_{i}" for i in range(1, 6)]


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
