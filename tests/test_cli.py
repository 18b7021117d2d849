"""CLI error paths: one clear line naming the file and the problem, exit code 2, no traceback."""
import dataclasses
import importlib
import subprocess
import sys

import pytest
from conftest import mobilenet_weights

from odtk.export import ExportConfig
from odtk.infer import InferConfig
from odtk.main import main, parse
from odtk.model import Model
from odtk.train import TrainConfig


def test_defaults_follow_odtk():
    a = parse(["train", "m.pth", "--annotations", "a.json"])
    assert a.backbone is None and importlib.import_module("odtk.train").DEFAULT_BACKBONE == "ResNet50FPN"
    assert a.batch is None and a.resize == 800 and a.max_size == 1333
    assert a.jitter == [640, 1024] and a.iters == 90000 and a.milestones == [60000, 80000]
    assert a.lr == 0.01 and a.warmup == 1000 and a.gamma == 0.1 and a.regularization_l2 == 1e-4
    assert a.val_iters == 8000 and a.anchor_ious == [0.4, 0.5] and a.augment_hue == 0.0002
    assert a.augment_brightness == a.augment_contrast == a.augment_saturation == 0.002
    assert a.master == "127.0.0.1:29500" and not a.augment_crop
    e = parse(["export", "m.pth", "m.onnx"])
    assert e.size == [1280, 1280] and e.batch == 2 and e.calibration_batches == 2


def field_defaults(config) -> dict:
    """A config dataclass's defaults by field (required fields have none); Augment's as augment_<field>."""
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(config)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    augment = defaults.pop("augment", None)
    if augment is not None:
        defaults.update({f"augment_{k}": v for k, v in vars(augment).items()})
    return defaults


def plain(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("argv, config, renamed, unflagged", [
    (["train", "m.pth", "--annotations", "a.json"], TrainConfig, {}, {"augment_flip"}),
    (["infer", "m.pth"], InferConfig, {}, set()),
    (["export", "m.pth", "m.onnx"], ExportConfig, {"export": "output"}, set()),
])
def test_every_cli_default_is_the_config_default(argv, config, renamed, unflagged):
    """One source of truth: a flag left out means the dataclass field's default, so Python users of
    TrainConfig/InferConfig/ExportConfig get what the CLI does."""
    defaults = field_defaults(config)
    compared = []
    for dest, value in vars(parse(argv)).items():
        name = renamed.get(dest, dest)
        if name in defaults:
            assert plain(value) == plain(defaults.pop(name)), f"--{dest.replace('_', '-')}"
            compared.append(name)
    assert set(defaults) == unflagged and len(compared) >= 10
    if config is TrainConfig:       # the only field without a flag: main passes flip=True, the default
        assert defaults["augment_flip"] is True and TrainConfig(model="m", annotations="a").augment.brightness > 0


@pytest.mark.parametrize("argv, target, expected", [
    (["train", "m.pth", "--annotations", "a.json"], ("odtk.train", "train"),
     TrainConfig(model="m.pth", annotations="a.json")),
    (["infer", "m.pth"], ("odtk.infer", "infer"), InferConfig(model="m.pth")),
    (["export", "m.pth", "m.onnx"], ("odtk.export", "export"), ExportConfig(model="m.pth", output="m.onnx")),
])
def test_the_cli_builds_the_default_config(argv, target, expected, monkeypatch, tmp_path):
    """`odtk train m.pth --annotations a.json` hands train() exactly TrainConfig(model=..., annotations=...)."""
    monkeypatch.chdir(tmp_path)
    seen = []
    # odtk.train/infer/export are the package's functions; their modules are reached through importlib
    monkeypatch.setattr(importlib.import_module(target[0]), target[1], lambda cfg, **_: seen.append(cfg))
    assert main(argv) == 0
    assert seen == [expected]


def test_verbose_before_or_after_the_command():
    assert parse(["--verbose", "infer", "m.pth"]).verbose
    assert parse(["export", "m.pth", "m.onnx", "--verbose"]).verbose
    assert not parse(["infer", "m.pth"]).verbose


def test_bad_master_is_rejected(capsys):
    with pytest.raises(SystemExit):
        parse(["--master", "nohost", "train", "m.pth", "--annotations", "a.json"])
    assert "address:port" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "m.pth", "--annotations", "missing.json"], "missing.json: annotations file not found"),
    (["infer", "missing.pth", "--images", "."], "missing.pth: model file not found"),
    (["infer", "model.onnx"], "model.onnx: model file not found"),
    (["infer", "model.plan"], "model.plan: model file not found"),
    (["convert", "nowhere", "out.json"], "nowhere: no such folder"),
])
def test_error_paths(argv, message, caplog, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in caplog.text
    assert "Traceback" not in caplog.text


def test_export_missing_model(tmp_path, caplog):
    assert main(["export", str(tmp_path / "m.pth"), str(tmp_path / "m.onnx")]) == 2
    assert "m.pth: model file not found" in caplog.text
    assert main(["export", str(tmp_path / "m.pth"), str(tmp_path / "m.onnx"), "--opset", "11"]) == 2
    assert "opset 17 or newer" in caplog.text


def test_bad_backbone_weights_file(synthetic, tmp_path, caplog):
    images, train, _ = synthetic
    (tmp_path / "w.pth").write_bytes(b"garbage")
    argv = ["train", str(tmp_path / "m.pth"), "--annotations", train, "--images", images, "--backbone",
            "ResNet18FPN", "--backbone-weights", str(tmp_path / "w.pth"), "--iters", "1"]
    assert main(argv) == 2
    assert "w.pth: cannot read backbone weights" in caplog.text
    assert not (tmp_path / "m.pth").exists()


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "odtk", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "export" in out.stdout
    out = subprocess.run([sys.executable, "-m", "odtk", "infer", "nothere.pth"], capture_output=True, text=True)
    assert out.returncode == 2 and "nothere.pth: model file not found" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("with_dali", [False, True])
def test_train_with_augment_crop(synthetic, tmp_path, monkeypatch, with_dali):
    if with_dali:
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    seen = []
    train_module = importlib.import_module("odtk.train")
    real = train_module.CocoDataset

    def dataset(*args, **kwargs):       # the training set is built with the crop on
        seen.append(kwargs.get("augment"))
        return real(*args, **kwargs)
    monkeypatch.setattr(train_module, "CocoDataset", dataset)
    images, train, _ = synthetic
    out = str(tmp_path / "m.pth")
    argv = ["train", out, "--annotations", train, "--images", images, "--backbone", "MobileNetV2FPN",
            "--batch", "2", "--iters", "2", "--warmup", "1", "--resize", "128", "--max-size", "128",
            "--jitter", "96", "128", "--loader-workers", "0", "--augment-crop"] + (["--with-dali"] if with_dali else [])
    weights = mobilenet_weights()
    if weights:
        argv += ["--backbone-weights", weights]
    assert main(argv) == 0
    assert seen[0].crop and Model.load(out)[1]["iteration"] == 2
