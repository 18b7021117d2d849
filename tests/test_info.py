"""`odtk info` (checkpoint, ONNX, plan, bad files) and conv-BN fusion (every backbone, Detector.load, export)."""
import copy
import importlib

import pytest
import torch

from odtk.backbones import BACKBONES
from odtk.fuse import BatchNorm, conv_bn_pairs, fuse_conv_bn, fused_copy
from odtk.model import Model, ModelConfig


# -- conv-BN fusion ---------------------------------------------------------------------------------------------
def _model_with_real_statistics(backbone: str, pretrained: bool, dtype: torch.dtype = torch.float32) -> Model:
    """A model whose BatchNorms hold statistics measured on data and affine parameters away from identity, as a
    trained model's: a wrongly folded BN shows, and activations keep a trained model's scale (made-up statistics
    let them grow through a deep ResNet until float rounding alone exceeds any tolerance)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = Model(config=ModelConfig(backbones=[backbone], num_classes=3, pretrained=False)).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None       # the statistics of the batch below, not a blend with the initial ones
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
        model.train()(torch.randn(2, 3, 64, 96, generator=g, dtype=dtype))
    if pretrained:   # the same weights and statistics in FrozenBatchNorm2d (which has no num_batches_tracked)
        frozen = Model(config=ModelConfig(**{**model.config.__dict__, "pretrained": True})).to(dtype)
        frozen.load_state_dict(model.state_dict(), strict=False)
        model = frozen
    return model.eval()


def _outputs(model: Model, x: torch.Tensor) -> tuple:
    """(FPN features, class and box heads) of a one-backbone model."""
    with torch.no_grad():
        features = next(iter(model.backbones.values()))(x)
        return features, [model.cls_head(f) for f in features] + [model.box_head(f) for f in features]


def _count_bn(model: torch.nn.Module) -> int:
    return sum(isinstance(m, BatchNorm) for m in model.modules())


@pytest.mark.parametrize("pretrained", [True, False], ids=["frozen-bn", "batchnorm2d"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_fusion_keeps_outputs_for_every_backbone(backbone, pretrained):
    model = _model_with_real_statistics(backbone, pretrained)
    before = _count_bn(model)
    fused = fused_copy(model)
    assert before > 0 and _count_bn(fused) == 0, "every BatchNorm of the body is folded"
    assert _count_bn(model) == before, "the original model keeps its BatchNorms"
    x = torch.randn(1, 3, 64, 96)
    (features, heads), (fused_features, fused_heads) = _outputs(model, x), _outputs(fused, x)
    for a, b in zip(heads, fused_heads):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    for a, b in zip(features, fused_features):   # float32 rounding through 100+ layers: ~1e-4 of the range
        torch.testing.assert_close(b, a, atol=1e-3 * float(a.abs().max()), rtol=0)


def test_fusion_is_exact_in_float64():
    """In float64 the fused model equals the unfused one to rounding: the fold is the same function (float32's
    differences above are rounding, not an approximation)."""
    model = _model_with_real_statistics("ResNet18FPN", True, torch.float64)
    x = torch.randn(1, 3, 64, 96, dtype=torch.float64)
    (features, heads), (fused_features, fused_heads) = _outputs(model, x), _outputs(fused_copy(model), x)
    for a, b in zip(features + heads, fused_features + fused_heads):
        torch.testing.assert_close(b, a, atol=1e-10 * float(a.abs().max()), rtol=0)


def test_fuse_finds_resnet_pairs_counts_them_and_leaves_eval_mode():
    model = Model(config=ModelConfig(backbones=["ResNet18FPN"], num_classes=3, pretrained=False)).train()
    body = model.backbones["ResNet18FPN"].body.net
    pairs = list(conv_bn_pairs(model))
    assert (body, "conv1", "bn1") in pairs and (body.layer2[0].downsample, "0", "1") in pairs
    n = _count_bn(model)
    assert fuse_conv_bn(model) == n == 20 and not model.training   # a fused model only runs inference


def test_detector_load_fuses_and_from_model_does_not(trained):
    from odtk.detector import Detector
    model_path, *_ = trained
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
    model = _model_with_real_statistics("ResNet18FPN", pretrained)
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
