"""What the model found: evaluation plots (infer --plots), training results.csv/png, progress lines for logs."""
import csv
import io
import logging
import os
import re
import subprocess
import sys

from conftest import mobilenet_weights
from odtk.main import main
from odtk.plots import RESULT_COLUMNS, TrainingResults, confusion_matrix, pr_curves, write_plots
from odtk.progress import LogProgress, plain_line, progress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAIN = re.compile(r"^train \d+/\d+ \(\d+%\) cls \d+\.\d{3} box \d+\.\d{3} lr \S+ \d+\.\d{2} im/s( ETA \w+)?$")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table_rows(text):
    """name -> (boxes, AP, AP50) from the printed per-class table."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:4] == ["class", "boxes", "AP", "AP50"]) + 2
    rows = {}
    for line in lines[start:]:
        if line.startswith("AP "):
            break
        name, boxes, ap, ap50 = line.rsplit(None, 3)
        rows[name.strip()] = (int(boxes), ap, ap50)
    return rows


# ---------------------------------------------------------------- evaluation plots

def test_infer_plots_match_the_printed_table(trained, tmp_path, capsys):
    model, images, train_json, _, _ = trained
    folder, out = tmp_path / "plots", tmp_path / "dets.json"
    assert main(["infer", model, "--images", images, "--annotations", train_json, "--output", str(out),
                 "--resize", "128", "--max-size", "128", "--batch", "4", "--loader-workers", "0",
                 "--plots", str(folder)]) == 0
    table = table_rows(capsys.readouterr().out)
    for name in ("pr_curve.png", "confusion_matrix.png", "per_class_ap.png"):
        data = (folder / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    rows = read_csv(folder / "per_class.csv")
    assert [r["class"] for r in rows] == list(table) and len(rows) >= 2
    for r in rows:
        boxes, ap, ap50 = table[r["class"]]
        assert (int(r["boxes"]), f"{float(r['AP']):.3f}", f"{float(r['AP50']):.3f}") == (boxes, ap, ap50)
    # the PR plot's legend carries the same AP50 / AP
    from odtk.evaluate import evaluate
    for curve in pr_curves(evaluate(train_json, str(out))):
        _, ap, ap50 = table[curve["name"]]
        assert curve["label50"].endswith(f"AP50 {ap50}") and curve["label"].endswith(f"AP {ap}")
        assert curve["p50"].shape == (101,)


def test_confusion_matrix_counts_a_hand_made_case():
    box = lambda x, y: [x, y, 10, 10]   # noqa: E731
    coco = {"images": [{"id": 1}, {"id": 2}],
            "categories": [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}],   # sorted by id: a (3), b (7)
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": box(0, 0)},
                            {"id": 2, "image_id": 1, "category_id": 7, "bbox": box(30, 30)},
                            {"id": 3, "image_id": 2, "category_id": 7, "bbox": box(0, 0)},      # missed
                            {"id": 4, "image_id": 2, "category_id": 3, "bbox": box(60, 60), "iscrowd": 1}]}
    dets = [{"image_id": 1, "category_id": 3, "bbox": box(0, 1), "score": 0.9},      # a found as a
            {"image_id": 1, "category_id": 3, "bbox": box(0, 0), "score": 0.6},      # duplicate: false alarm
            {"image_id": 1, "category_id": 3, "bbox": box(31, 30), "score": 0.8},    # b taken for a
            {"image_id": 1, "category_id": 7, "bbox": box(0, 0), "score": 0.1},      # under the score threshold
            {"image_id": 2, "category_id": 7, "bbox": box(50, 0), "score": 0.7},     # false alarm
            {"image_id": 2, "category_id": 3, "bbox": box(0, 6), "score": 0.5}]      # IoU 0.25 with b: false alarm
    matrix, ids = confusion_matrix(coco, dets, score_threshold=0.3)
    assert ids == [3, 7]
    # rows: true a, b, background; columns: predicted a, b, background
    assert matrix.tolist() == [[1, 0, 0],
                               [1, 0, 1],
                               [2, 1, 0]]
    # at 0.05 the 0.1 one counts too: last by score, its box is taken, so it is a false alarm
    assert confusion_matrix(coco, dets, score_threshold=0.05)[0][2].tolist() == [2, 2, 0]


def test_plots_without_matplotlib_fail_before_inference(trained, tmp_path, monkeypatch, caplog):
    model, images, train_json, _, _ = trained
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib raises ImportError
    out = tmp_path / "dets.json"
    with caplog.at_level(logging.ERROR, logger="odtk"):
        code = main(["infer", model, "--images", images, "--annotations", train_json, "--output", str(out),
                     "--plots", str(tmp_path / "plots")])
    assert code == 2 and not out.exists()
    assert "--plots needs matplotlib: pip install 'odtk[plots]'" in caplog.text
    assert "Traceback" not in caplog.text


def test_plots_need_annotations(trained, tmp_path, caplog):
    model, images, _, _, _ = trained
    out = tmp_path / "dets.json"
    assert main(["infer", model, "--images", images, "--output", str(out), "--plots", str(tmp_path)]) == 2
    assert "--plots" in caplog.text and "--annotations" in caplog.text and not out.exists()


def test_write_plots_without_detections_warns(synthetic, tmp_path, caplog):
    _, _, val_json = synthetic
    dets = tmp_path / "none.json"
    dets.write_text("[]")
    with caplog.at_level(logging.WARNING, logger="odtk"):
        assert write_plots(val_json, str(dets), str(tmp_path / "plots")) == {}
    assert "no detections" in caplog.text and not (tmp_path / "plots").exists()


# ---------------------------------------------------------------- training results

def test_training_writes_results_and_plain_progress_then_resume_trims(synthetic, tmp_path):
    images, train_json, val_json = synthetic
    model = tmp_path / "net.pth"
    args = ["train", str(model), "--annotations", train_json, "--images", images, "--backbone", "MobileNetV2FPN",
            "--batch", "4", "--resize", "128", "--max-size", "128", "--jitter", "112", "144", "--iters", "20",
            "--milestones", "100", "--warmup", "5", "--anchor-scales", "2", "2.52", "3.17", "--clip-grad", "10",
            "--val-annotations", val_json, "--val-iters", "10", "--loader-workers", "0", "--device", "cpu"]
    if mobilenet_weights():
        args += ["--backbone-weights", mobilenet_weights()]
    env = {**os.environ, "PYTHONPATH": REPO}
    run = subprocess.run([sys.executable, "-m", "odtk", *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    # progress: plain lines, no tqdm redraws
    assert "\r" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("train ")]
    assert len(lines) >= 10 and all(PLAIN.match(line) for line in lines), lines
    assert lines[-1].startswith("train 20/20 (100%)")
    assert any(re.match(r"^infer 8/8 \(100%\)", line) for line in run.stderr.splitlines())

    csv_path, png = tmp_path / "net-results.csv", tmp_path / "net-results.png"
    rows = read_csv(csv_path)
    assert list(rows[0]) == list(RESULT_COLUMNS)
    assert [r["iteration"] for r in rows] == ["10", "20"]
    for r in rows:
        assert all(float(r[k]) >= 0 for k in RESULT_COLUMNS[1:]), r   # validation ran on both
    assert png.stat().st_size > 10_000

    # a run killed after logging past its checkpoint: the resume drops the later rows, keeps the earlier ones
    with open(csv_path, "a") as f:
        f.write("25,9.0,9.0,0.01,1.0,,\n")
    args[args.index("--iters") + 1] = "30"
    assert main(args) == 0
    resumed = read_csv(csv_path)
    assert [r["iteration"] for r in resumed] == ["10", "20", "30"] and resumed[:2] == rows
    assert resumed[2]["val/AP"] != ""


def test_results_rows_merge_and_csv_without_matplotlib(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    results = TrainingResults(model=str(tmp_path / "m.pth"))
    values = {"loss/cls": 0.5, "loss/box": 0.25, "lr": 0.01, "images_per_s": 3.0}
    results.add(10, values)
    results.add(12, values)                                    # a validation off the 10s
    results.add(12, {**values, "val/AP": 0.125, "val/AP50": 0.5})
    with caplog.at_level(logging.WARNING, logger="odtk"):
        results.save(plot=True)
        results.save(plot=True)
    rows = read_csv(tmp_path / "m-results.csv")
    assert [(r["iteration"], r["val/AP"], r["val/AP50"]) for r in rows] == [("10", "", ""), ("12", "0.125", "0.5")]
    assert caplog.text.count("odtk[plots]") == 1 and not (tmp_path / "m-results.png").exists()
    # resuming at 10 keeps the first row; a new run (no resume) starts empty
    assert [r["iteration"] for r in TrainingResults(model=str(tmp_path / "m.pth"), resume_at=10).rows] == [10]
    assert TrainingResults(model=str(tmp_path / "m.pth")).rows == []


# ---------------------------------------------------------------- progress

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_log_progress_every_five_percent_or_thirty_seconds():
    lines, clock = [], Clock()
    bar = LogProgress(total=200, desc="infer", unit="img", emit=lines.append, clock=clock)
    with bar:
        for _ in range(25):       # 1 s per image: lines at 10 and 20 (5%)
            clock.now += 1
            bar.update(1)
        clock.now += 40           # a slow one: 30 s since the last line
        bar.update(1)
        bar.update(1)             # 27: neither
    assert [line.split()[1] for line in lines] == ["10/200", "20/200", "26/200", "27/200"]   # the last one: close
    assert lines[0] == "infer 10/200 (5%) 1 img/s ETA 3m"


def test_plain_line_format():
    line = plain_line(desc="train", n=120, total=650, unit="it", rate=0.32,
                      postfix={"cls": "0.412", "box": "0.301", "lr": "0.01", "im/s": "3.10"})
    assert line == "train 120/650 (18%) cls 0.412 box 0.301 lr 0.01 3.10 im/s ETA 27m"
    assert plain_line(desc="export", n=1, total=1, unit="step", rate=2.0, postfix={}) == "export 1/1 (100%) 2 step/s"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_tqdm_on_a_terminal_and_plain_otherwise():
    from tqdm import tqdm
    term = Terminal()
    with progress(total=3, desc="x", stream=term) as bar:
        assert isinstance(bar, tqdm)
        bar.update(3)
    assert "\r" in term.getvalue()
    assert isinstance(progress(total=3, desc="x", stream=io.StringIO()), LogProgress)
