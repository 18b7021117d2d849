"""ONNX with dynamic height and width (export --dynamic-size): the graph takes any multiple of the stride, makes its
anchors from the traced feature-map shapes, and `odtk infer model.onnx` resizes images as `odtk infer model.pth`."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'odtk[onnx]')")
onnx = pytest.importorskip("onnx")

from odtk.data import CocoDataset, collate                              # noqa: E402
from odtk.detector import Detector                                     # noqa: E402
from odtk.export import ExportConfig, _CalibrationReader, calibration_dataset, export, read_metadata  # noqa: E402
from odtk.infer import InferConfig, infer                               # noqa: E402
from odtk.main import main                                              # noqa: E402
from odtk.model import Model                                            # noqa: E402
from odtk.synthetic import MAX_ASPECT, write_dataset                    # noqa: E402

VARY = (195, 320)
# the tiny synthetic model was trained at 128 on 128 px squares; these keep the varied images near that scale
RESIZE, MAX_SIZE = 144, 224


def _session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """16 synthetic images of varied sizes (sides 195-320, aspect up to 1.5): (images folder, annotations)."""
    folder = tmp_path_factory.mktemp("varied")
    annotations, _ = write_dataset(str(folder), train=16, val=0, seed=3, vary=VARY)
    return str(folder / "images"), annotations


@pytest.fixture(scope="module")
def dynamic(trained, tmp_path_factory):
    model_path, *_ = trained
    out = str(tmp_path_factory.mktemp("dyn") / "dynamic.onnx")
    assert main(["export", model_path, out, "--size", "128", "--dynamic-size"]) == 0
    return out


def test_synthetic_varied_sizes(varied):
    images, annotations = varied
    coco = json.load(open(annotations))
    shapes = set()
    for entry in coco["images"]:
        w, h = Image.open(os.path.join(images, entry["file_name"])).size
        assert (w, h) == (entry["width"], entry["height"])
        assert VARY[0] <= min(w, h) and max(w, h) <= VARY[1] and max(w, h) <= MAX_ASPECT * min(w, h)
        shapes.add((h, w))
    assert len(shapes) == len(coco["images"]) == 16
    assert any(h > w for h, w in shapes) and any(w > h for h, w in shapes)
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        image = coco["images"][a["image_id"] - 1]
        assert x + w <= image["width"] and y + h <= image["height"]


def test_graph_has_symbolic_size_and_matches_pytorch_at_several_sizes(trained, dynamic, varied):
    model_path, *_ = trained
    images, annotations = varied
    model, _ = Model.load(model_path)
    model.eval()
    proto = onnx.load(dynamic)
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    session = _session(dynamic)
    shapes, found = set(), 0
    for resize, max_size, first, n in ((128, 128, 0, 2), (144, 224, 2, 1), (144, 224, 3, 1), (224, 320, 4, 2),
                                       (32, 64, 6, 1)):
        dataset = CocoDataset(images, annotations, resize=resize, max_size=max_size)
        x = collate([dataset[i] for i in range(first, first + n)])[0]
        h, w = x.shape[-2:]
        shapes.add((h, w))
        scores, boxes, classes = session.run(None, {"input_1": x.numpy()})
        ref_s, ref_b, ref_c = model.predict(x)
        assert scores.shape == (n, 100) and boxes.shape == (n, 100, 4)
        np.testing.assert_allclose(scores, ref_s.numpy(), atol=1e-5)
        # same anchors, decode and clipping: boxes to float precision, inside this input's own edges
        np.testing.assert_allclose(boxes, ref_b.numpy(), atol=1e-3)
        assert (classes == ref_c.numpy()).all()
        assert boxes[..., 0::2].max() <= w and boxes[..., 1::2].max() <= h and boxes.min() >= 0
        found += int((scores > 0).sum())
    assert len(shapes) >= 4 and any(h != w for h, w in shapes) and found > 0


def test_metadata_and_detector_resize_like_pth(trained, dynamic, tmp_path):
    model_path, images, *_ = trained
    meta = read_metadata(dynamic)
    # the trained fixture used --resize 128 --max-size 128: the checkpoint's values are the default
    assert meta["dynamic"] is True and (meta["resize"], meta["max_size"]) == (128, 128)
    detector = Detector.load(dynamic)
    assert detector.backend.fit is None and (detector.backend.resize, detector.backend.max_size) == (128, 128)
    assert "any input size" in repr(detector)
    ref = Detector.load(model_path, device="cpu")
    image = os.path.join(images, sorted(os.listdir(images))[0])
    got, want = detector(image), ref(image)
    assert len(want) > 0 and torch.equal(got.labels, want.labels)
    assert torch.allclose(got.boxes, want.boxes, atol=1e-2) and torch.allclose(got.scores, want.scores, atol=1e-4)
    out = str(tmp_path / "flags.onnx")
    assert main(["export", model_path, out, "--size", "64", "--dynamic-size", "--resize", "200",
                 "--max-size", "300"]) == 0
    assert (read_metadata(out)["resize"], read_metadata(out)["max_size"]) == (200, 300)


def _ap(model, images, annotations, output, **kw):
    return infer(InferConfig(model=model, images=images, annotations=annotations, output=output, batch=4,
                             resize=RESIZE, max_size=MAX_SIZE, loader_workers=0, **kw))["AP"]


def test_varied_sizes_ap_equals_pth_fp32_and_int8(trained, dynamic, varied, tmp_path):
    model_path, *_ = trained
    images, annotations = varied
    ref = _ap(model_path, images, annotations, str(tmp_path / "pth.json"), device="cpu")
    got = _ap(dynamic, images, annotations, str(tmp_path / "onnx.json"))
    assert ref > 0
    assert abs(got - ref) < 0.002, (got, ref)
    int8 = str(tmp_path / "int8.onnx")
    export(ExportConfig(model=model_path, output=int8, size=(128, 128), batch=4, int8=True, dynamic_size=True,
                        calibration_images=images, calibration_batches=4, resize=RESIZE, max_size=MAX_SIZE))
    meta = read_metadata(int8)
    assert meta["dynamic"] and meta["int8"] and _session(int8).get_inputs()[0].shape[2:] == ["height", "width"]
    got8 = _ap(int8, images, annotations, str(tmp_path / "int8.json"))
    assert abs(got8 - ref) < 0.01, (got8, ref)


def test_calibration_feeds_each_image_at_its_own_size(trained, dynamic, varied):
    images, _ = varied
    meta = dict(read_metadata(dynamic), resize=RESIZE, max_size=MAX_SIZE)
    dataset = calibration_dataset(images, (128, 128), 5, meta)
    reader = _CalibrationReader(dataset, batch=1, batches=5, size_divisible=meta["size_divisible"])
    shapes = [reader.get_next()["input_1"].shape for _ in range(5)]
    assert reader.get_next() is None
    assert all(s[0] == 1 and s[2] % 32 == 0 and s[3] % 32 == 0 for s in shapes)
    assert len({s[2:] for s in shapes}) > 1
    assert all(min(s[2:]) >= RESIZE and max(s[2:]) <= MAX_SIZE + 31 for s in shapes)


def test_raw_heads_dynamic_size(trained, tmp_path):
    model_path, *_ = trained
    out = str(tmp_path / "raw.onnx")
    assert main(["export", model_path, out, "--size", "128", "--raw-heads", "--dynamic-size"]) == 0
    assert read_metadata(out)["dynamic"] is True
    session = _session(out)
    for h, w in ((96, 160), (256, 192)):
        outputs = session.run(None, {"input_1": np.zeros((1, 3, h, w), np.float32)})
        for i, stride in enumerate((8, 16, 32, 64, 128)):
            side = (-(-h // stride), -(-w // stride))
            assert outputs[i].shape == (1, 27, *side) and outputs[5 + i].shape == (1, 36, *side)


def test_dynamic_size_errors(trained, tmp_path, caplog):
    model_path, *_ = trained
    assert main(["export", model_path, str(tmp_path / "m.plan"), "--dynamic-size-opts", "64", "128", "256"]) == 2
    assert "--dynamic-size-opts sets the input sizes a --dynamic-size plan takes: add --dynamic-size" in caplog.text
    assert main(["export", model_path, str(tmp_path / "m.onnx"), "--resize", "200"]) == 2
    assert "add --dynamic-size or drop them" in caplog.text
    assert main(["export", model_path, str(tmp_path / "m.onnx"), "--dynamic-size", "--max-size", "0"]) == 2
    assert "--max-size 0: must be at least 1" in caplog.text
    assert not os.listdir(tmp_path)
