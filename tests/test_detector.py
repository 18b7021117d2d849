"""odtk.Detector: every input type gives the boxes `odtk infer` writes, for .pth and .onnx models."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import odtk
from odtk.detector import Detector, expand_inputs, to_uint8
from odtk.main import main
from odtk.model import Model
from odtk.utils import OdtkError


def _rows_of(path: str, image_id: int) -> list:
    return sorted((r for r in json.load(open(path)) if r["image_id"] == image_id), key=lambda r: -r["score"])


def _assert_same_as_infer(found, rows):
    """Detections vs the JSON rows of `odtk infer` for the same image: boxes to 0.01 px, same scores."""
    assert len(found) == len(rows) > 0
    coco = found.to_coco(rows[0]["image_id"])
    for got, want in zip(coco, rows):
        assert got["category_id"] == want["category_id"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
        assert np.allclose(got["bbox"], want["bbox"], atol=0.011)


def _all_input_types(path: str) -> dict:
    pil = Image.open(path)
    array = np.asarray(pil.convert("RGB"))
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    return {"path": path, "pil": pil, "numpy": array, "uint8 tensor": tensor, "float tensor": tensor.float() / 255}


def _check_inputs_agree(detector: Detector, path: str, **kw):
    results = {name: detector(image, **kw) for name, image in _all_input_types(path).items()}
    ref = results["path"]
    for name, found in results.items():
        assert torch.equal(found.labels, ref.labels), name
        assert torch.allclose(found.boxes, ref.boxes, atol=1e-4), name
        assert torch.allclose(found.scores, ref.scores, atol=1e-6), name
    return ref


@pytest.fixture(scope="module")
def infer_rows(trained, tmp_path_factory):
    """odtk infer over the validation images of the trained synthetic model: (model, image path, id, rows JSON)."""
    model, images, train_json, out, _ = trained
    val_json = os.path.join(os.path.dirname(train_json), "val.json")
    output = str(tmp_path_factory.mktemp("detector") / "rows.json")
    assert main(["infer", model, "--images", images, "--annotations", val_json, "--output", output,
                 "--resize", "128", "--max-size", "128", "--loader-workers", "0"]) == 0
    first = json.load(open(val_json))["images"][0]
    return model, os.path.join(images, first["file_name"]), first["id"], output


def test_public_api():
    assert {"Detector", "Model", "ModelConfig", "train", "TrainConfig", "export", "ExportConfig", "evaluate",
            "convert_voc", "convert_yolo"} <= set(odtk.__all__)
    assert all(hasattr(odtk, name) for name in odtk.__all__)


def test_pth_every_input_type_equals_odtk_infer(infer_rows):
    model, path, image_id, rows = infer_rows
    detector = Detector.load(model)
    found = _check_inputs_agree(detector, path, resize=128, max_size=128)
    _assert_same_as_infer(found, _rows_of(rows, image_id))
    assert found.image_size == (128, 128) and found.source == path
    assert len(found.names) == len(found) and set(found.names) <= {"square", "circle", "triangle"}


def test_onnx_every_input_type_equals_odtk_infer(infer_rows, tmp_path):
    pytest.importorskip("onnxruntime")
    model, path, image_id, _ = infer_rows
    onnx = str(tmp_path / "m.onnx")
    assert main(["export", model, onnx, "--size", "128"]) == 0
    val_json = os.path.join(os.path.dirname(os.path.dirname(path)), "val.json")
    rows = str(tmp_path / "rows.json")
    assert main(["infer", onnx, "--images", os.path.dirname(path), "--annotations", val_json, "--output", rows,
                 "--loader-workers", "0"]) == 0
    detector = Detector.load(onnx)
    assert detector.backend.fit == (128, 128)
    _assert_same_as_infer(_check_inputs_agree(detector, path), _rows_of(rows, image_id))
    with pytest.raises(OdtkError, match="can only be stricter"):
        detector(path, score_threshold=0.001)


def test_mixed_sizes_in_one_batch_stay_inside_each_image(trained, tmp_path):
    model, images, _, _, _ = trained
    first = sorted(os.listdir(images))[0]
    big = Image.open(os.path.join(images, first)).convert("RGB").resize((192, 160))
    small = big.resize((64, 48))
    detector = Detector.load(model, score_threshold=0.01)
    alone = detector(big, resize=160, max_size=192)
    together = detector.predict([big, small], batch_size=2, resize=160, max_size=192)
    assert [r.image_size for r in together] == [(160, 192), (48, 64)]
    # the largest image is padded alike alone and in the batch: the same detections
    assert torch.allclose(together[0].boxes, alone.boxes, atol=1e-3)
    for found in together:
        h, w = found.image_size
        assert len(found) > 0
        assert bool((found.boxes[:, [0, 2]] <= w).all()) and bool((found.boxes[:, [1, 3]] <= h).all())
        assert bool((found.boxes >= 0).all())


def test_per_call_limits(trained):
    model, images, _, _, _ = trained
    path = os.path.join(images, sorted(os.listdir(images))[0])
    detector = Detector.load(model)
    everything = detector(path, score_threshold=0.0, max_detections=100)
    strict = detector(path, score_threshold=0.5)
    assert bool((strict.scores > 0.5).all()) and len(strict) <= len(everything)
    assert len(detector(path, max_detections=2)) <= 2
    with pytest.raises(OdtkError, match="score_threshold 2"):
        detector(path, score_threshold=2)


def test_inputs_expand_and_bad_inputs_say_why(synthetic, tmp_path):
    images, _, _ = synthetic
    assert len(expand_inputs(images)) == len(expand_inputs(os.path.join(images, "*.jpg"))) > 1
    with pytest.raises(OdtkError, match="nothing.jpg: image file not found"):
        expand_inputs(str(tmp_path / "nothing.jpg"))
    with pytest.raises(OdtkError, match="no file matches"):
        expand_inputs(str(tmp_path / "*.png"))
    with pytest.raises(OdtkError, match="expected C x H x W"):
        to_uint8(torch.zeros(5, 4, 4))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(OdtkError, match="bad.jpg: cannot read image"):
        to_uint8(str(bad))
    assert to_uint8(np.zeros((4, 5), np.uint8)).shape == (3, 4, 5)     # grayscale


def test_class_without_category_id_is_dropped_not_a_crash(synthetic, tmp_path, caplog):
    """A model with more classes than category ids (--classes 5 on 3 categories): no IndexError."""
    images, _, val_json = synthetic
    model = Model(config=odtk.ModelConfig(backbones=["MobileNetV2FPN"], num_classes=5, category_ids=[10, 20, 30],
                                          class_names=["square", "circle", "triangle"]))
    with torch.no_grad():     # class index 4 scores high everywhere
        model.cls_head[-1].bias.view(-1, 5)[:, 4] = 5.0
    path = str(tmp_path / "five.pth")
    model.save(path)
    output = str(tmp_path / "rows.json")
    assert main(["infer", path, "--images", images, "--annotations", val_json, "--output", output,
                 "--resize", "128", "--max-size", "128", "--loader-workers", "0"]) == 0
    assert {r["category_id"] for r in json.load(open(output))} <= {10, 20, 30}
    assert "class index 4 has no category id" in caplog.text


@pytest.mark.slow
def test_bccd_photo_every_input_type_equals_odtk_infer(bccd_model, tmp_path):
    """The README example: a BCCD model on one BCCD photo as a path, PIL image, array and tensor."""
    model, test_json, images = bccd_model
    rows = str(tmp_path / "rows.json")
    assert main(["infer", model, "--images", images, "--annotations", test_json, "--output", rows,
                 "--resize", "256", "--max-size", "352", "--loader-workers", "0"]) == 0
    first = json.load(open(test_json))["images"][0]
    path = os.path.join(images, first["file_name"])
    found = _check_inputs_agree(Detector.load(model), path, resize=256, max_size=352)
    _assert_same_as_infer(found, _rows_of(rows, first["id"]))
    assert found.image_size == (480, 640)


def test_odtk_infer_clips_each_image_to_its_own_size(trained, tmp_path):
    """A batch of mixed sizes: the small image's boxes stop at its own edges, not the padded batch's."""
    model, images, _, _, _ = trained
    first = Image.open(os.path.join(images, sorted(os.listdir(images))[0])).convert("RGB")
    folder = tmp_path / "mixed"
    folder.mkdir()
    first.resize((256, 192)).save(folder / "a_big.png")
    first.resize((48, 64)).save(folder / "b_small.png")   # portrait: padded to the batch's width
    output = str(tmp_path / "rows.json")
    assert main(["infer", model, "--images", str(folder), "--output", output, "--batch", "2", "--resize", "192",
                 "--max-size", "256", "--loader-workers", "0"]) == 0
    rows = json.load(open(output))
    sizes = {1: (256, 192), 2: (48, 64)}
    assert {r["image_id"] for r in rows} == {1, 2}
    for r in rows:
        x, y, w, h = r["bbox"]
        width, height = sizes[r["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= width + 0.01 and y + h <= height + 0.01


def test_compile_and_device_reach_the_network(trained, monkeypatch, tmp_path):
    """`odtk infer --compile --device cpu` (Detector.load(compile=True, device=...)): the network goes through
    torch.compile (recorded here: a real compile takes minutes on 2 cores; bench_gpu.py times it on a GPU) and
    the detections are the uncompiled ones."""
    from odtk.infer import InferConfig, infer
    model, images, _, _, _ = trained
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    path = os.path.join(images, sorted(os.listdir(images))[0])
    plain = Detector.load(model, device="cpu")(path)
    fast = Detector.load(model, device="cpu", compile=True)
    assert compiled == [fast.backend.model] and fast.backend.device.type == "cpu"
    found = fast(path)
    assert torch.equal(found.boxes, plain.boxes) and torch.equal(found.scores, plain.scores)
    infer(InferConfig(model=model, images=images, output=str(tmp_path / "d.json"), compile=True, device="cpu",
                      resize=128, max_size=128, loader_workers=0))
    assert len(compiled) == 2
