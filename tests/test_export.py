"""ONNX export: end-to-end parity with PyTorch in ONNX Runtime, raw heads, dynamic batch, INT8."""
import json
import os

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'odtk[onnx]')")
onnx = pytest.importorskip("onnx")

from odtk.data import CocoDataset, collate                              # noqa: E402
from odtk.export import ExportConfig, export, export_onnx, read_metadata  # noqa: E402
from odtk.main import main                                              # noqa: E402
from odtk.model import Model, ModelConfig                               # noqa: E402
from odtk.utils import OdtkError                                        # noqa: E402

SIZE = (128, 128)


def _batch(images, train, n):
    ds = CocoDataset(images, train, fit=SIZE)
    return collate([ds[i] for i in range(n)], pad_to=SIZE)[0]


def _session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def end2end(trained, tmp_path_factory):
    model_path, images, train, *_ = trained
    out = str(tmp_path_factory.mktemp("onnx") / "model.onnx")
    assert main(["export", model_path, out, "--size", "128", "--batch", "2"]) == 0
    return out


def test_end_to_end_matches_pytorch_with_dynamic_batch(trained, end2end):
    model_path, images, train, *_ = trained
    model, _ = Model.load(model_path)
    model.eval()
    onnx.checker.check_model(onnx.load(end2end))
    meta = read_metadata(end2end)
    assert meta["flavour"] == "end2end" and meta["size"] == [128, 128] and meta["category_ids"] == [10, 20, 30]
    session = _session(end2end)
    assert [o.name for o in session.get_outputs()] == ["scores", "boxes", "classes"]
    for n in (1, 3):
        x = _batch(images, train, n)
        scores, boxes, classes = session.run(None, {"input_1": x.numpy()})
        ref_s, ref_b, ref_c = model.predict(x)
        assert scores.shape == (n, 100) and boxes.shape == (n, 100, 4) and classes.shape == (n, 100)
        assert (ref_s > 0).sum() > 0, "the tiny model should detect something"
        np.testing.assert_allclose(scores, ref_s.numpy(), atol=1e-4)
        for i in range(n):
            _assert_same_detections(scores[i], boxes[i], classes[i], ref_s[i].numpy(), ref_b[i].numpy(),
                                    ref_c[i].numpy())


def _assert_same_detections(s, b, c, rs, rb, rc):
    """Same detections as sets: float differences may swap near-equal scores, or the 100th place."""
    floor = rs[-1] + 1e-3 if rs[-1] > 0 else 1e-3
    for score, box, cls in zip(s, b, c):
        if score <= floor:
            continue
        match = (rc == cls) & (np.abs(rs - score) < 1e-4) & (np.abs(rb - box).max(axis=1) < 2e-2)
        assert match.any(), f"ONNX detection {score:.4f} {box} class {cls} not in PyTorch's"


def test_raw_heads_names_shapes_and_values(trained, tmp_path):
    model_path, images, train, *_ = trained
    model, _ = Model.load(model_path)
    out = str(tmp_path / "raw.onnx")
    export_onnx(model, out, size=SIZE, raw_heads=True)
    session = _session(out)
    names = [o.name for o in session.get_outputs()]
    assert [i.name for i in session.get_inputs()] == ["input_1"]
    assert names == [f"score_{i}" for i in range(1, 6)] + [f"box_{i}" for i in range(1, 6)]
    x = _batch(images, train, 3)
    outputs = session.run(None, {"input_1": x.numpy()})
    cls, box = model.eval()(x)
    for i, stride in enumerate((8, 16, 32, 64, 128)):
        assert outputs[i].shape == (3, 27, 128 // stride, 128 // stride)
        assert outputs[5 + i].shape == (3, 36, 128 // stride, 128 // stride)
        np.testing.assert_allclose(outputs[i], cls[i].sigmoid().detach().numpy(), atol=1e-4)
        np.testing.assert_allclose(outputs[5 + i], box[i].detach().numpy(), atol=1e-3)
    assert read_metadata(out)["flavour"] == "raw"


def test_narrow_heads_export(tmp_path):
    """--head-channels: the FPN and heads' width travels in the model, and its ONNX gives the same heads."""
    torch.manual_seed(0)
    model = Model(config=ModelConfig(backbones=["MobileNetV2FPN"], num_classes=2, channels=64)).eval()
    assert model.cls_head[0].weight.shape == (64, 64, 3, 3)
    assert model.backbones["MobileNetV2FPN"].smooth3.out_channels == 64
    out = str(tmp_path / "narrow.onnx")
    export_onnx(model, out, size=SIZE, raw_heads=True)
    x = torch.randn(2, 3, *SIZE)
    outputs = _session(out).run(None, {"input_1": x.numpy()})
    with torch.no_grad():
        cls, box = model(x)
    for i in range(5):
        np.testing.assert_allclose(outputs[i], cls[i].sigmoid().numpy(), atol=1e-4)
        np.testing.assert_allclose(outputs[5 + i], box[i].numpy(), atol=1e-3)


def test_infer_onnx_gives_pytorch_ap(trained, end2end, tmp_path):
    from odtk.infer import InferConfig, infer
    model_path, images, train, *_ = trained
    common = dict(images=images, annotations=train, batch=4, loader_workers=0)
    ref = infer(InferConfig(model=model_path, output=str(tmp_path / "pth.json"), resize=128, max_size=128, **common))
    got = infer(InferConfig(model=end2end, output=str(tmp_path / "onnx.json"), **common))
    assert ref["AP"] > 0
    assert abs(got["AP"] - ref["AP"]) < 0.002


def test_raw_heads_onnx_is_refused_by_infer(trained, tmp_path, caplog):
    model_path, images, *_ = trained
    out = str(tmp_path / "raw.onnx")
    assert main(["export", model_path, out, "--size", "128", "--raw-heads"]) == 0
    assert main(["infer", out, "--images", images]) == 2
    assert "raw-heads ONNX" in caplog.text


def test_int8_export_calibrates_and_reuses_table(trained, tmp_path, caplog):
    from odtk.infer import InferConfig, infer
    model_path, images, train, *_ = trained
    out, table = str(tmp_path / "int8.onnx"), str(tmp_path / "calib.json")
    cfg = ExportConfig(model=model_path, output=out, size=SIZE, batch=4, int8=True, calibration_images=images,
                       calibration_batches=3, calibration_table=table)
    export(cfg)
    proto = onnx.load(out)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "NonMaxSuppression"} <= ops
    assert os.path.isfile(table)
    res = infer(InferConfig(model=out, images=images, annotations=train, output=str(tmp_path / "d.json"),
                            batch=4, loader_workers=0))
    assert res["AP"] > 0
    # the saved table is enough the second time: no calibration images needed
    os.unlink(out)
    export(ExportConfig(model=model_path, output=out, size=SIZE, batch=4, int8=True,
                        calibration_images=str(tmp_path / "nowhere"), calibration_table=table))
    assert os.path.isfile(out)


def test_raw_heads_int8_is_symmetric(trained, tmp_path):
    import onnx.numpy_helper as nh
    model_path, images, *_ = trained
    out = str(tmp_path / "raw-int8.onnx")
    export(ExportConfig(model=model_path, output=out, size=SIZE, batch=2, raw_heads=True, int8=True,
                        calibration_images=images, calibration_batches=2))
    proto = onnx.load(out)
    inits = {i.name: i for i in proto.graph.initializer}
    zero_points = [nh.to_array(inits[n.input[2]]) for n in proto.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits]
    assert zero_points and all((z == 0).all() and z.dtype == np.int8 for z in zero_points)   # TensorRT's form
    assert read_metadata(out)["flavour"] == "raw"
    assert len(_session(out).get_outputs()) == 10


def test_export_errors(trained, tmp_path, caplog):
    model_path, images, *_ = trained
    assert main(["export", model_path, str(tmp_path / "m.onnx"), "--size", "100"]) == 2
    assert "multiple of 32" in caplog.text
    assert main(["export", model_path, str(tmp_path / "m.onnx"), "--int8", "--calibration-images",
                 str(tmp_path / "none")]) == 2
    assert "calibration images folder not found" in caplog.text
    assert main(["export", model_path, str(tmp_path / "m.txt")]) == 2
    assert "unknown export target" in caplog.text
    assert not any(f.endswith(".onnx") or f.startswith(".tmp") for f in os.listdir(tmp_path))


def test_few_calibration_images_warns(trained, tmp_path, caplog):
    model_path, images, *_ = trained
    few = tmp_path / "few"
    few.mkdir()
    for name in sorted(os.listdir(images))[:2]:
        (few / name).write_bytes(open(os.path.join(images, name), "rb").read())
    out = str(tmp_path / "int8.onnx")
    export(ExportConfig(model=model_path, output=out, size=SIZE, batch=2, int8=True, calibration_images=str(few),
                        calibration_batches=4))
    assert "fewer than the 8 asked for" in caplog.text and os.path.isfile(out)
