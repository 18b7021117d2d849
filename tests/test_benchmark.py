"""odtk benchmark: one table of every deployment form, with the AP users get from `odtk infer`, timings and sizes;
forms that cannot run here are rows saying why; bad input is one line."""
import contextlib
import importlib
import io
import logging
import os

import pytest

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'odtk[onnx]')")

from odtk.benchmark import (benchmark_table, default_size, tensorrt_missing,  # noqa: E402
                            work_folder)
from odtk.infer import InferConfig, infer                                                        # noqa: E402
from odtk.main import main                                                                       # noqa: E402

FORMS = ["PyTorch", "ONNX Runtime fp32", "ONNX Runtime fp32 dyn", "ONNX Runtime INT8", "TensorRT FP16", "TensorRT INT8"]
BENCH = importlib.import_module("odtk.benchmark")   # odtk.benchmark is also the package's function


@pytest.fixture(scope="module")
def run(trained, tmp_path_factory):
    """One real `odtk benchmark` on the tiny model (its rows caught on their way to the table): (exit code, what it
    printed, rows, output folder)."""
    model, images, train, *_ = trained
    out = str(tmp_path_factory.mktemp("bench") / "forms")
    caught = []
    real = BENCH.benchmark

    def spy(cfg):
        caught.extend(real(cfg))
        return caught

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(BENCH, "benchmark", spy)
        code = main(["benchmark", model, "--images", images, "--annotations", train, "--batch", "4",
                     "--images-limit", "8", "--calibration-batches", "1", "--loader-workers", "0",
                     "--output-dir", out])
    return code, printed.getvalue(), {r["form"]: r for r in caught}, out


def _infer_ap(model, images, annotations, output, **kwargs):
    return infer(InferConfig(model=model, images=images, annotations=annotations, output=output, batch=4,
                             loader_workers=0, **kwargs))


def test_cli_prints_one_table_of_every_form(run):
    code, printed, rows, _ = run
    assert code == 0
    lines = printed.strip().splitlines()
    assert lines[0].split()[:6] == ["form", "AP", "AP50", "ms/img", "b1", "img/s"] and "MB" in lines[0]
    assert [line.split("  ")[0].strip() for line in lines[2:]] == FORMS
    assert list(rows) == FORMS


def test_ap_is_what_odtk_infer_gives(run, trained, tmp_path):
    """PyTorch at the training resize and ONNX fp32 at the default size (128x128, the synthetic images at the
    training resize) give exactly `odtk infer`'s AP on the same files; INT8 stays within a few points."""
    _, _, rows, out = run
    model, images, train, *_ = trained
    eager = _infer_ap(model, images, train, str(tmp_path / "pth.json"), resize=128, max_size=128)
    onnx = _infer_ap(os.path.join(out, "model-fp32.onnx"), images, train, str(tmp_path / "onnx.json"))
    assert eager["AP"] > 0, "the tiny model should find something"
    assert rows["PyTorch"]["AP"] == pytest.approx(eager["AP"], abs=1e-9)
    assert rows["PyTorch"]["AP50"] == pytest.approx(eager["AP50"], abs=1e-9)
    assert rows["ONNX Runtime fp32"]["AP"] == pytest.approx(onnx["AP"], abs=1e-9)
    assert rows["ONNX Runtime fp32"]["AP"] == pytest.approx(eager["AP"], abs=1e-3)   # measured: equal to 1e-9
    assert rows["ONNX Runtime INT8"]["AP"] == pytest.approx(eager["AP"], abs=0.05)
    assert rows["ONNX Runtime fp32"]["note"].endswith("128x128")
    # the dynamic graph resizes each image as the .pth does: the .pth's AP
    assert rows["ONNX Runtime fp32 dyn"]["AP"] == pytest.approx(eager["AP"], abs=2e-3)
    assert rows["ONNX Runtime fp32 dyn"]["note"].endswith("each image resized to 128 max 128")


def test_timings_sizes_and_kept_files(run, trained):
    _, _, rows, out = run
    model = trained[0]
    for form in FORMS[:4]:
        row = rows[form]
        assert row["ms_per_image"] > 0 and row["images_per_s"] > 0 and row["batch"] == 4, form
        assert os.path.isfile(row["file"]) and row["size_mb"] == pytest.approx(os.path.getsize(row["file"]) / 1e6)
    assert rows["PyTorch"]["file"] == model
    assert sorted(os.listdir(out)) == ["model-fp32-dynamic.onnx", "model-fp32.onnx", "model-int8.onnx",
                                       "onnx-runtime-fp32-detections.json", "onnx-runtime-fp32-dyn-detections.json",
                                       "onnx-runtime-int8-detections.json", "pytorch-detections.json"]


def test_tensorrt_rows_say_why_they_cannot_run(run):
    why = tensorrt_missing()
    if not why:
        pytest.skip("TensorRT engines can be built here")
    _, printed, rows, _ = run
    for form in ("TensorRT FP16", "TensorRT INT8"):
        row = rows[form]
        assert row["note"] == why and row["AP"] is None and row["ms_per_image"] is None and row["file"] is None
        assert any(line.startswith(form) and line.rstrip().endswith(why) for line in printed.splitlines())


def test_default_size_is_what_most_images_need():
    """Landscape 640x480 at resize 256 / max 352 -> 256x341, padded to 256x352; one portrait image is outvoted."""
    sizes = [(480, 640)] * 3 + [(640, 480)]
    assert default_size(sizes, resize=256, max_size=352, divisible=32) == (256, 352)
    assert default_size([(100, 100)], resize=800, max_size=1333, divisible=128) == (896, 896)


def test_temp_folder_is_removed_and_output_dir_kept(tmp_path):
    with work_folder(None) as tmp:
        assert os.path.isdir(tmp)
    assert not os.path.exists(tmp)
    kept = str(tmp_path / "a" / "b")
    with work_folder(kept) as folder:
        assert folder == kept
    assert os.path.isdir(kept)


def test_table_marks_forms_that_did_not_run():
    rows = [{"form": "PyTorch", "AP": 0.5, "AP50": 0.75, "ms_per_image": 12.34, "images_per_s": 80.0, "batch": 8,
             "size_mb": 9.12, "file": "m.pth", "note": "cpu"},
            {"form": "TensorRT FP16", "AP": None, "AP50": None, "ms_per_image": None, "images_per_s": None,
             "batch": 8, "size_mb": None, "file": None, "note": "needs a CUDA GPU"}]
    lines = benchmark_table(rows).splitlines()
    assert "img/s b8" in lines[0]
    assert lines[2].split() == ["PyTorch", "0.5000", "0.7500", "12.3", "80.0", "9.1", "cpu"]
    assert lines[3].split() == ["TensorRT", "FP16", "-", "-", "-", "-", "-", "needs", "a", "CUDA", "GPU"]


@pytest.mark.parametrize("argv, message", [
    (["m.onnx"], "m.onnx: odtk benchmark starts from the training checkpoint and exports every form itself: give "
                 "the .pth"),
    (["missing.pth"], "missing.pth: model file not found"),
    (["{model}", "--images-limit", "0"], "--images-limit 0: must be at least 1"),
    (["{model}", "--images", "nowhere"], "nowhere: images folder not found"),
    (["{model}", "--annotations", "none.json"], "none.json: annotations file not found"),
    (["{model}", "--size", "100"], "--size 100 100: each side must be a positive multiple of 32"),
])
def test_bad_input_is_one_line(argv, message, trained, tmp_path, caplog, monkeypatch):
    model, images, train, *_ = trained
    monkeypatch.chdir(tmp_path)
    argv = [a.format(model=model) for a in argv]
    defaults = {"--images": images, "--annotations": train}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    with caplog.at_level(logging.ERROR, logger="odtk"):
        assert main(["benchmark", *argv]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"odtk benchmark: error: {message}"]
    assert os.listdir(tmp_path) == []     # nothing written
