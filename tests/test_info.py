"""`odtk info` (checkpoint, ONNX, plan, bad files) and conv-BN fusion (every backbone, Detector.load, export)."""
import copy
import importlib
import logging

import pytest
import torch

from odtk.backbones import BACKBONES
from odtk.fuse import BatchNorm, conv_bn_pairs, fuse_conv_bn, fused_copy
from odtk.model import Model, ModelConfig


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """An untrained MobileNetV2FPN checkpoint as training saves one: 3 classes, the settings of a 128 px run, an
    iteration and EMA weights (training a model would only change the weights' values, which nothing here reads)."""
    from dataclasses import asdict
    from odtk.train import TrainConfig
    path = str(tmp_path_factory.mktemp("info") / "model.pth")
    torch.manual_seed(0)
    model = Model(config=ModelConfig(backbones=["MobileNetV2FPN"], num_classes=3, pretrained=True,
                                     category_ids=[10, 20, 30], class_names=["circle", "square", "triangle"]))
    settings = TrainConfig(model=path, annotations="train.json", resize=128, max_size=128, jitter=(112, 144),
                           iters=60, ema=0.999)
    model.save(path, iteration=60, train_config=asdict(settings),
               ema={"state_dict": model.state_dict(), "decay": 0.999, "updates": 60})
    return path


# -- conv-BN fusion ---------------------------------------------------------------------------------------------
def _measured_model(backbone: str, dtype: torch.dtype = torch.float32) -> Model:
    """A model (trainable BatchNorm2d) whose BatchNorms hold statistics measured on data and affine parameters away
    from identity, as a trained model's: a wrongly folded BN shows, and activations keep a trained model's scale
    (made-up statistics let them grow through a deep ResNet until float rounding alone exceeds any tolerance)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = Model(config=ModelConfig(backbones=[backbone], num_classes=3, pretrained=False))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None       # the statistics of the batch below, not a blend with the initial ones
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
        model.train()(torch.randn(2, 3, 64, 96, generator=g))
    return model.to(dtype).eval()


def _frozen(model: Model) -> Model:
    """The same weights and statistics in the pretrained layout: FrozenBatchNorm2d, frozen stem."""
    frozen = Model(config=ModelConfig(**{**model.config.__dict__, "pretrained": True})).to(model.cls_head[0].weight)
    frozen.load_state_dict(model.state_dict(), strict=False)   # FrozenBatchNorm2d has no num_batches_tracked
    return frozen.eval()


def _variant(backbone: str, pretrained: bool, dtype: torch.dtype = torch.float32) -> Model:
    model = _measured_model(backbone, dtype)
    return _frozen(model) if pretrained else model


def _outputs(model: Model, x: torch.Tensor) -> tuple:
    """(FPN features, class and box heads) of a one-backbone model."""
    with torch.no_grad():
        features = next(iter(model.backbones.values()))(x)
        return features, [model.cls_head(f) for f in features] + [model.box_head(f) for f in features]


def _count_bn(model: torch.nn.Module) -> int:
    return sum(isinstance(m, BatchNorm) for m in model.modules())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_fusion_keeps_outputs_for_every_backbone(backbone):
    """Both configurations, pretrained=False (eval-mode nn.BatchNorm2d) and pretrained=True (FrozenBatchNorm2d), in
    float64: heads within 1e-4 and every output equal to rounding, so the fold is the same function (in float32 a
    random-weight ResNet152's own rounding reaches ~1e-4, which would hide a small error)."""
    trainable = _measured_model(backbone, torch.float64)
    for model in (trainable, _frozen(trainable)):
        before = _count_bn(model)
        fused = fused_copy(model)
        assert before > 0 and _count_bn(fused) == 0, "every BatchNorm of the body is folded"
        assert _count_bn(model) == before, "the original model keeps its BatchNorms"
        x = torch.randn(1, 3, 32, 64, dtype=torch.float64)   # small: float64 depthwise/grouped convs are slow
        (features, heads), (fused_features, fused_heads) = _outputs(model, x), _outputs(fused, x)
        for a, b in zip(heads, fused_heads):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
        for a, b in zip(features + heads, fused_features + fused_heads):
            torch.testing.assert_close(b, a, atol=1e-9 * float(a.abs().max()), rtol=0)


@pytest.mark.parametrize("backbone", ["ResNet50FPN", "MobileNetV2FPN"])
def test_fusion_in_float32_heads_within_1e_4(backbone):
    """What inference runs: float32, the default backbone and the small one."""
    trainable = _measured_model(backbone)
    x = torch.randn(1, 3, 64, 96)
    for model in (trainable, _frozen(trainable)):
        for a, b in zip(_outputs(model, x)[1], _outputs(fused_copy(model), x)[1]):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=0)


def test_fuse_finds_resnet_pairs_counts_them_and_leaves_eval_mode():
    model = Model(config=ModelConfig(backbones=["ResNet18FPN"], num_classes=3, pretrained=False)).train()
    body = model.backbones["ResNet18FPN"].body.net
    pairs = list(conv_bn_pairs(model))
    assert (body, "conv1", "bn1") in pairs and (body.layer2[0].downsample, "0", "1") in pairs
    n = _count_bn(model)
    assert fuse_conv_bn(model) == n == 20 and not model.training   # a fused model only runs inference


def test_detector_load_fuses_and_from_model_does_not(checkpoint):
    from odtk.detector import Detector
    model_path = checkpoint
    loaded = Detector.load(model_path, device="cpu")
    assert _count_bn(loaded.backend.model) == 0
    model, _ = Model.load(model_path)
    n = _count_bn(model)
    in_memory = Detector.from_model(model, device="cpu")   # validation during training: never altered
    assert n > 0 and _count_bn(in_memory.backend.model) == n


@pytest.mark.parametrize("pretrained", [True, False], ids=["frozen-bn", "batchnorm2d"])
def test_onnx_after_fusion_has_no_batchnorm_and_same_outputs(tmp_path, monkeypatch, pretrained):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from odtk.export import export_onnx
    model = _variant("ResNet18FPN", pretrained)
    path = str(tmp_path / "raw.onnx")
    export_onnx(model, path, size=(64, 64), raw_heads=True)
    assert _count_bn(model) > 0, "export fuses a copy"
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "BatchNormalization" not in ops
    # unfused, FrozenBatchNorm2d exports as Mul + Add after each Conv; fused, the Convs are all that is left
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.backbones.modules())
    heads = sum(isinstance(m, torch.nn.Conv2d) for m in [*model.cls_head, *model.box_head])
    assert ops.count("Mul") == 0 and ops.count("Conv") == convs + heads * len(model.strides)
    if pretrained:   # what fusion saved: the exporter keeps FrozenBatchNorm2d's arithmetic as it is
        monkeypatch.setattr(importlib.import_module("odtk.export"), "fused_copy", lambda m: copy.deepcopy(m).eval())
        export_onnx(model, path, size=(64, 64), raw_heads=True)
        assert [n.op_type for n in onnx.load(path).graph.node].count("Mul") == _count_bn(model)
    x = torch.randn(2, 3, 64, 64)
    outputs = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input_1": x.numpy()})
    with torch.no_grad():
        cls, box = model(x)
    for got, want in zip(outputs, [c.sigmoid() for c in cls] + list(box)):
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=0)


# -- odtk info ----------------------------------------------------------------------------------------------------
def _info_cli(argv: list, capsys) -> str:
    from odtk.main import main
    assert main(["info", *argv]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("pretrained", [True, False], ids=["pretrained", "scratch"])
def test_info_checkpoint_parameters_as_the_model_counts_them(tmp_path, capsys, pretrained):
    import odtk
    path = str(tmp_path / "m.pth")
    Model(config=ModelConfig(backbones=["MobileNetV2FPN"], num_classes=3, pretrained=pretrained,
                             class_names=["WBC", "RBC", "Platelets"], category_ids=[4, 5, 6])).save(path, iteration=7)
    model, _ = Model.load(path)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (trainable < total) == pretrained, "a pretrained body's stem is frozen"
    d = odtk.info(path, size=[96])
    assert (d["parameters"], d["trainable"], d["iteration"], d["size"]) == (total, trainable, 7, [96, 96])
    out = _info_cli([path, "--size", "96"], capsys)
    assert f"{total:,}" in out and f"trainable {trainable:,}" in out
    assert "3: WBC, RBC, Platelets (category ids 4-6)" in out and "MobileNetV2FPN, FPN and heads 256 wide" in out
    assert "9 per cell: ratios 1 2 0.5, scales 4 5.04 6.35, strides 8 16 32 64 128" in out
    assert f"{d['gflops']:.2f} at 96x96" in out and "a multiply-add counts as 2 FLOPs" in out
    assert "EMA              no" in out and "no settings saved" in out


def test_info_gflops_scale_with_pixels_and_default_to_the_training_size(checkpoint, capsys):
    import odtk
    model_path = checkpoint
    d = odtk.info(model_path)
    assert d["size"] == [128, 128] and "training --resize 128 --max-size 128" in d["size_source"]
    assert d["iteration"] == 60 and d["train_config"]["iters"] == 60 and d["ema"] == {"decay": 0.999, "updates": 60}
    out = _info_cli([model_path], capsys)
    assert "EMA              yes (decay 0.999, 60 updates" in out and "iteration        60" in out
    assert "resize=128 max_size=128 jitter=112,144 iters=60" in out and "ema=0.999" in out
    assert "verbose" not in out and "master" not in out, "the run's plumbing is left out"
    small, wide, large = (odtk.info(model_path, size=s)["gflops"] for s in ([256, 256], [256, 512], [512, 512]))
    assert 0 < d["gflops"] < small
    assert wide / small == pytest.approx(2, rel=0.03) and large / small == pytest.approx(4, rel=0.03)
    assert odtk.info(model_path, size=[250, 500])["size"] == [256, 512], "padded as the loaders pad"


def test_info_flops_convention_on_a_plain_convolution():
    from odtk.info import count_flops
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    # one multiply-add per output pixel, output channel and kernel tap: 2 FLOPs each
    assert count_flops(conv, torch.zeros(1, 3, 10, 10)) == 2 * (10 * 10) * 8 * (3 * 3 * 3)


def test_info_onnx_flavour_opset_and_shapes(checkpoint, tmp_path, capsys):
    pytest.importorskip("onnx")
    import odtk
    from odtk.constants import DEFAULT_OPSET
    from odtk.export import export_onnx
    from odtk.main import main
    model_path = checkpoint
    end2end, raw = str(tmp_path / "m.onnx"), str(tmp_path / "raw.onnx")
    assert main(["export", model_path, end2end, "--size", "128", "--batch", "1"]) == 0
    export_onnx(Model.load(model_path)[0], raw, size=(96, 128), raw_heads=True, opset=DEFAULT_OPSET + 1)
    d = odtk.info(end2end)
    assert (d["flavour"], d["opset"], d["int8"]) == ("end2end", DEFAULT_OPSET, None)
    assert d["inputs"] == [{"name": "input_1", "type": "float32", "shape": ["batch", 3, 128, 128]}]
    assert [o["name"] for o in d["outputs"]] == ["scores", "boxes", "classes"]
    out = _info_cli([end2end], capsys)
    assert "end-to-end (decode + NMS inside" in out and f"opset            {DEFAULT_OPSET}" in out
    assert "input_1 float32 [batch, 3, 128, 128]" in out and "INT8             no" in out
    assert "(category ids 10 20 30)" in out and "FPN and heads 256 wide" in out and d["channels"] == 256
    out = _info_cli([raw], capsys)
    assert "raw heads (no decode/NMS" in out and f"opset            {DEFAULT_OPSET + 1}" in out
    assert "input            input_1 float32 [batch, 3, 96, 128]" in out and "size             96x128" in out
    assert "score_3 float32 [batch, 27, 3, 4]" in out and "box_5 float32 [batch, 36, 1, 1]" in out


def _plan(path: str, meta: dict, *, magic: bytes = b"ODTKPLAN", version: int = 2, dynamic: bool = False,
          profile=((128, 128),) * 3) -> None:
    """A plan file as odtk._C's Engine::save lays it out (odtk/csrc/engine.cpp), with stand-in engine bytes;
    version 1: the layout before dynamic sizes."""
    import json
    import struct
    text = json.dumps(meta).encode()
    sizes = [side for size in profile for side in size]
    extra = struct.pack("<I6I", int(dynamic), *sizes) if version >= 2 else b""
    with open(path, "wb") as f:
        f.write(magic + struct.pack("<II", version, 128) + extra + struct.pack("<Q", len(text)) + text + b"\0" * 1000)


@pytest.mark.parametrize("version", [1, 2])
def test_info_plan_reads_the_header_without_tensorrt(version, checkpoint, tmp_path, capsys):
    import odtk
    from odtk.onnx_meta import metadata
    model_path = checkpoint
    meta = {**metadata(Model.load(model_path)[0], (128, 128), "plan"), "precision": "FP16"}
    path = str(tmp_path / "m.plan")
    _plan(path, meta, version=version)
    d = odtk.info(path)
    assert d["dynamic"] is False and d["engine_bytes"] == 1000
    assert d["size_profile"] == (None if version == 1 else [[128, 128]] * 3)
    out = _info_cli([path], capsys)
    assert "TensorRT plan" in out and "precision        FP16" in out and "size             128x128" in out
    assert "need odtk._C built with TensorRT" in out and "0.0 MB" in out


def test_info_dynamic_plan_shows_its_profile(checkpoint, tmp_path, capsys):
    import odtk
    from odtk.onnx_meta import metadata
    meta = {**metadata(Model.load(checkpoint)[0], (96, 160), "plan", dynamic=True, preprocess=(96, 160)),
            "precision": "FP32"}
    path = str(tmp_path / "dynamic.plan")
    _plan(path, meta, dynamic=True, profile=((32, 32), (96, 160), (160, 160)))
    d = odtk.info(path)
    assert d["dynamic"] is True and d["size_profile"] == [[32, 32], [96, 160], [160, 160]]
    assert d["engine_bytes"] == 1000 and d["size"] == [96, 160]
    out = _info_cli([path], capsys)
    assert ("size             dynamic: 32x32 to 160x160 (multiples of the stride), tuned for 96x160; images resized "
            "to 96, max 160") in out


def test_info_bad_files_are_one_line(tmp_path, caplog, capsys):
    from odtk.main import main
    cases = {"missing.pth": (None, "model file not found"),
             "bad.pth": (b"not a checkpoint", "not a readable odtk checkpoint"),
             "bad.onnx": (b"not onnx", "not a readable ONNX model"),
             "bad.plan": (b"GARBAGE!" * 4, "not an odtk TensorRT plan"),
             "cut.plan": (b"ODTKPLAN\x01\0", "truncated odtk plan"),
             "cut2.plan": (b"ODTKPLAN\x02\0\0\0\x80\0\0\0\x01\0", "truncated odtk plan")}
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        caplog.clear()
        assert main(["info", str(path)]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "\n" not in errors[0] and message in errors[0] and str(path) in errors[0]
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err and not out
    _plan(str(tmp_path / "new.plan"), {}, version=3)
    assert main(["info", str(tmp_path / "new.plan")]) == 2
    assert "plan format 3, this odtk reads formats 1 to 2" in caplog.text
    path = str(tmp_path / "m.pth")
    Model(config=ModelConfig(backbones=["MobileNetV2FPN"], num_classes=1)).save(path)
    caplog.clear()
    assert main(["info", path, "--size", "0"]) == 2 and "--size 0: give one positive side" in caplog.text
