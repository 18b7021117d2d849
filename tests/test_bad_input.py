"""Issue "Bad input": each bad flag or path is a one-line error naming it (exit 2, no traceback) or a logged
warning that keeps going, and never costs an existing file. Tiny synthetic data (8 + 4 images of 96 px)."""
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import mobilenet_weights
from odtk.main import main
from odtk.model import Model


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """`odtk synthetic data --train 8 --val 4 --size 96`: (images, train.json, val.json)."""
    folder = tmp_path_factory.mktemp("bad-input")
    assert main(["synthetic", str(folder), "--train", "8", "--val", "4", "--size", "96"]) == 0
    return str(folder / "images"), str(folder / "train.json"), str(folder / "val.json")


def train_argv(model: str, data, *extra: str) -> list:
    images, train, _ = data
    argv = ["train", model, "--annotations", train, "--images", images, "--backbone", "MobileNetV2FPN",
            "--batch", "2", "--resize", "96", "--max-size", "96", "--jitter", "96", "96", "--iters", "3",
            "--warmup", "1", "--val-iters", "1000", "--loader-workers", "0"]
    weights = mobilenet_weights()
    return argv + (["--backbone-weights", weights] if weights else []) + list(extra)


@pytest.fixture(scope="module")
def tiny(data, tmp_path_factory):
    """A MobileNetV2FPN checkpoint trained 3 iterations on `data`."""
    model = str(tmp_path_factory.mktemp("tiny") / "m.pth")
    assert main(train_argv(model, data)) == 0
    return model


@pytest.fixture
def model(tiny, tmp_path):
    """A private copy of the tiny checkpoint, which a test may try to spoil."""
    path = str(tmp_path / "m.pth")
    shutil.copy(tiny, path)
    return path


def snapshot(*paths: str) -> dict:
    return {p: (open(p, "rb").read(), os.stat(p).st_mtime_ns) for p in paths if os.path.isfile(p)}


def refused(argv: list, message: str, caplog, capsys, keep: tuple = ()) -> str:
    """main(argv) exits 2 with one error line holding `message`, no traceback, and the files in `keep` intact."""
    before = snapshot(*keep)
    caplog.clear()
    assert main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert message in errors[0], errors[0]
    out, err = capsys.readouterr()
    assert "Traceback" not in caplog.text + out + err
    assert snapshot(*keep) == before
    return errors[0]


# 1 -----------------------------------------------------------------------------------------------------------------
def test_1_nan_lr_is_refused_up_front(data, model, caplog, capsys):
    refused(train_argv(model, data, "--override", "--iters", "1", "--lr", "nan"),
            "--lr nan: must be a positive finite number", caplog, capsys, keep=(model,))
    refused(train_argv(model, data, "--override", "--lr", "inf", "--val-iters", "1"),
            "--lr inf: must be a positive finite number", caplog, capsys, keep=(model,))


def test_1_poisoned_weights_are_never_saved(data, model, caplog, capsys, monkeypatch):
    """A step that leaves NaN weights with a finite loss is caught before the save of that very iteration."""
    real_step = torch.optim.SGD.step

    def poisoned(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][-1].fill_(float("nan"))
        return result
    monkeypatch.setattr(torch.optim.SGD, "step", poisoned)
    message = refused(train_argv(model, data, "--override", "--iters", "1", "--val-iters", "1"),
                      "weights are not finite at iteration 1: training diverged", caplog, capsys, keep=(model,))
    assert f"{model} was not written by this run" in message
    fresh = model + ".new.pth"
    refused(train_argv(fresh, data, "--iters", "2", "--val-iters", "1"), "training diverged", caplog, capsys)
    assert not os.path.exists(fresh)


# 2 -----------------------------------------------------------------------------------------------------------------
BAD_TRAIN = [
    (["--resize", "0"], "--resize 0: must be at least 1"),
    (["--max-size", "0"], "--max-size 0: must be at least 1"),
    (["--jitter", "0", "96"], "--jitter 0 96: need 1 <= MIN <= MAX"),
    (["--batch", "0"], "--batch 0: must be at least 1"),
    (["--iters", "0"], "--iters 0: must be at least 1"),
    (["--iters", "3", "--schedule", "0.1"], "--iters 3 --schedule 0.1: less than one iteration"),
    (["--warmup", "-1"], "--warmup -1: must be at least 0"),
    (["--milestones", "0"], "--milestones 0: must be at least 1"),
    (["--anchor-ious", "0.6", "0.5"], "--anchor-ious 0.6 0.5: need 0 <= MIN <= MAX <= 1"),
    (["--anchor-ious", "0.4", "1.5"], "--anchor-ious 0.4 1.5: need 0 <= MIN <= MAX <= 1"),
    (["--anchor-scales", "2", "0"], "--anchor-scales 0.0: must be a positive finite number"),
    (["--loader-workers", "-1"], "--loader-workers -1: must be at least 0"),
    (["--val-iters", "0"], "--val-iters 0: must be at least 1"),
    (["--gamma", "0"], "--gamma 0.0: must be a positive finite number"),
    (["--regularization-l2", "-1"], "--regularization-l2 -1.0: must be a finite number >= 0"),
    (["--clip-grad", "nan"], "--clip-grad nan: must be a finite number >= 0"),
    (["--augment-hue", "-0.1"], "--augment-hue -0.1: must be a finite number >= 0"),
    (["--classes", "0"], "--classes 0: must be at least 1"),
    (["--head-channels", "0"], "--head-channels 0: must be at least 1"),
    (["--ema", "1"], "--ema 1.0: the decay must be between 0 and 1"),
    (["--nodes", "2", "--node-rank", "2"], "--nodes 2 --node-rank 2: need 0 <= node rank < nodes"),
]


@pytest.mark.parametrize("extra, message", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_2_train_sizes_and_counts_are_checked_up_front(data, model, extra, message, caplog, capsys):
    refused(train_argv(model, data, *extra), message, caplog, capsys, keep=(model,))
    assert "training" not in caplog.text          # refused before any data was loaded or model built


BAD_INFER = [
    (["--resize", "0"], "--resize 0: must be at least 1"),
    (["--max-size", "-5"], "--max-size -5: must be at least 1"),
    (["--batch", "0"], "--batch 0: must be at least 1"),
    (["--loader-workers", "-1"], "--loader-workers -1: must be at least 0"),
]


@pytest.mark.parametrize("extra, message", BAD_INFER, ids=[" ".join(a) for a, _ in BAD_INFER])
def test_2_infer_sizes_are_checked_up_front(data, model, tmp_path, extra, message, caplog, capsys):
    images, _, val = data
    out = tmp_path / "dets.json"
    out.write_text("[]")
    refused(["infer", model, "--images", images, "--annotations", val, "--output", str(out), *extra], message,
            caplog, capsys, keep=(str(out),))


BAD_EXPORT = [
    (["--size", "0"], "--size 0: one side (square) or height width, each >= 1"),
    (["--size", "96", "96", "96"], "--size 96 96 96: one side (square) or height width"),
    (["--batch", "0"], "--batch 0: must be at least 1"),
    (["--calibration-batches", "0"], "--calibration-batches 0: must be at least 1"),
    (["--opset", "11"], "--opset 11: odtk exports need opset 17 or newer"),
]


@pytest.mark.parametrize("extra, message", BAD_EXPORT, ids=[" ".join(a) for a, _ in BAD_EXPORT])
def test_2_export_sizes_are_checked_up_front(model, tmp_path, extra, message, caplog, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"an earlier export")
    refused(["export", model, str(out), *extra], message, caplog, capsys, keep=(str(out),))


# 3 -----------------------------------------------------------------------------------------------------------------
def test_3_unwritable_outputs_fail_before_the_work(data, model, tmp_path, caplog, capsys):
    images, _, val = data
    blocker = tmp_path / "somefile"          # root ignores chmod: a path under a regular file cannot be written
    blocker.write_text("not a folder")
    refused(train_argv(str(blocker / "m.pth"), data), f"cannot write MODEL there: {blocker} is a file, not a folder",
            caplog, capsys)
    assert "training" not in caplog.text
    refused(["infer", model, "--images", images, "--output", str(blocker / "d.json")],
            "cannot write --output there", caplog, capsys)
    refused(["export", model, str(blocker / "m.onnx")], "cannot write the export output there", caplog, capsys)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    for extra in ([], ["--override"]):
        refused(train_argv(str(folder), data, *extra), f"{folder}: is a folder; MODEL must be a file path",
                caplog, capsys)
    refused(["infer", model, "--images", images, "--annotations", val, "--output", str(folder)],
            f"{folder}: is a folder; --output must be a file path", caplog, capsys)
    assert os.listdir(folder) == []


def failing_saves(monkeypatch, fail_at: set) -> list:
    """Model.save raises OSError at the given save calls (1-based); returns the list of calls made."""
    real, calls = Model.save, []

    def save(self, path, **state):
        calls.append(state.get("iteration"))
        if len(calls) in fail_at:
            raise OSError(28, "No space left on device", path)
        return real(self, path, **state)
    monkeypatch.setattr(Model, "save", save)
    return calls


def test_3_a_failed_save_mid_training_is_retried(data, tmp_path, caplog, capsys, monkeypatch):
    path = str(tmp_path / "m.pth")
    calls = failing_saves(monkeypatch, fail_at={1})
    assert main(train_argv(path, data, "--iters", "2", "--val-iters", "1")) == 0
    assert calls == [1, 2] and Model.load(path)[1]["iteration"] == 2
    assert "cannot save the checkpoint at iteration 1 ([Errno 28] No space left on device" in caplog.text
    assert "training goes on and retries at the next save" in caplog.text


def test_3_a_failed_final_save_exits_2_naming_the_file(data, model, caplog, capsys, monkeypatch):
    failing_saves(monkeypatch, fail_at={1})
    message = refused(train_argv(model, data, "--override", "--iters", "2"),
                      f"{model}: cannot save the checkpoint at iteration 2 ([Errno 28] No space left on device",
                      caplog, capsys, keep=(model,))
    assert message.endswith("was not written by this run")


# 9, 10 -------------------------------------------------------------------------------------------------------------
def test_9_jitter_min_above_max(data, model, caplog, capsys):
    refused(train_argv(model, data, "--jitter", "300", "100"), "--jitter 300 100: need 1 <= MIN <= MAX",
            caplog, capsys, keep=(model,))


def test_10_unknown_backbone_lists_the_known_ones(data, model, caplog, capsys):
    refused(train_argv(model, data, "--override", "--backbone", "Foo"),
            "--backbone Foo: unknown backbone (choose from ResNet18FPN, ", caplog, capsys, keep=(model,))
    # and as a user sees it, from a fresh process
    images, train, _ = data
    out = subprocess.run([sys.executable, "-m", "odtk", "train", model, "--annotations", train, "--images", images,
                          "--backbone", "Foo"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})
    assert out.returncode == 2 and "Traceback" not in out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        "odtk train: error: --backbone Foo: unknown backbone (choose from ResNet18FPN, ResNet34FPN, ResNet50FPN, "
        "ResNet101FPN, ResNet152FPN, ResNeXt50_32x4dFPN, ResNeXt101_32x8dFPN, MobileNetV2FPN)"]


# 12 ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--backbone", "ResNet18FPN"], "resuming keeps the checkpoint's --backbone MobileNetV2FPN, not ResNet18FPN; "
                                    "drop --backbone to resume, or add --override"),
    (["--classes", "5"], "resuming keeps the checkpoint's --classes 3, not 5; drop --classes to resume, or add "
                         "--override"),
    (["--head-channels", "128"], "resuming keeps the checkpoint's --head-channels 256, not 128; drop "
                                 "--head-channels to resume, or add --override"),
])
def test_12_resume_with_other_model_flags_is_refused(data, model, extra, message, caplog, capsys):
    refused(train_argv(model, data, "--iters", "4", *extra), f"{model}: {message}", caplog, capsys, keep=(model,))
    assert Model.load(model)[1]["iteration"] == 3


# 13 ----------------------------------------------------------------------------------------------------------------
def test_13_int8_needs_calibration_images(model, tmp_path, caplog, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)        # the old default calibrated on the current folder
    out = tmp_path / "m.onnx"
    out.write_bytes(b"an earlier export")
    refused(["export", model, str(out), "--int8"], "--int8 needs --calibration-images FOLDER", caplog, capsys,
            keep=(str(out),))


# GPU count and --device (issue "GPU"): refused in one line before any process group or worker starts ---------------
@pytest.fixture
def one_gpu(monkeypatch):
    """PyTorch reports one CUDA GPU (nothing touches it: each refusal comes before any CUDA call)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_more_workers_than_gpus(data, model, caplog, capsys, one_gpu):
    refused(train_argv(model, data, "--override", "--workers", "2", "--device", "cuda"),
            "--workers 2: only 1 GPU(s) visible, one worker per GPU; use --workers 1, or --device cpu", caplog, capsys,
            keep=(model,))


def test_more_torchrun_ranks_than_gpus(data, model, caplog, capsys, one_gpu, monkeypatch):
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(logging.getLogger("odtk"), "setLevel", lambda level: None)   # rank 1 logs errors only anyway
    refused(train_argv(model, data, "--override"), "2 worker processes on this node but only 1 GPU(s) visible",
            caplog, capsys, keep=(model,))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a CUDA GPU")
@pytest.mark.parametrize("command", ["train", "infer", "export"])
def test_device_cuda_without_a_gpu(command, data, model, tmp_path, caplog, capsys):
    argv = {"train": train_argv(model, data, "--override"),
            "infer": ["infer", model, "--images", data[0], "--output", str(tmp_path / "d.json")],
            "export": ["export", model, str(tmp_path / "m.onnx")]}[command]
    refused(argv + ["--device", "cuda"], "--device cuda: PyTorch sees no CUDA GPU", caplog, capsys, keep=(model,))


def test_plan_on_the_cpu_is_refused(model, tmp_path, caplog, capsys):
    refused(["export", model, str(tmp_path / "m.plan"), "--device", "cpu"],
            "--device cpu: TensorRT engines are built and run on a GPU; export .onnx for the CPU", caplog, capsys)
    assert not (tmp_path / "m.plan").exists()
