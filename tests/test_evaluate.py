"""evaluate() returns the figures and the report text; it prints nothing (the caller shows the table)."""
import json
import logging

import pytest

from odtk.evaluate import evaluate


def _files(tmp_path, detections):
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 30, 40], "area": 1200,
                             "iscrowd": 0}],
            "categories": [{"id": 5, "name": "cell"}]}
    gt, dt = tmp_path / "gt.json", tmp_path / "dt.json"
    gt.write_text(json.dumps(coco))
    dt.write_text(json.dumps(detections))
    return str(gt), str(dt)


def test_evaluate_returns_ap_and_table_and_prints_nothing(tmp_path, capsys):
    gt, dt = _files(tmp_path, [{"image_id": 1, "category_id": 5, "bbox": [10, 10, 30, 40], "score": 0.9}])
    results = evaluate(gt, dt)
    assert capsys.readouterr().out == ""
    assert results["AP"] == pytest.approx(1.0) and results["AP50"] == pytest.approx(1.0)
    assert results["per_class"] == [{"id": 5, "name": "cell", "boxes": 1, "AP": pytest.approx(1.0),
                                     "AP50": pytest.approx(1.0)}]
    lines = results["table"].splitlines()
    assert lines[0].startswith(" Average Precision") and len([x for x in lines if x.startswith(" Average")]) == 12
    assert any(x.split() == ["cell", "1", "1.000", "1.000"] for x in lines)
    assert lines[-1] == "AP 1.0000  AP50 1.0000  (1 images)"


def test_evaluate_without_detections_is_zero_with_a_warning(tmp_path, capsys, caplog):
    gt, dt = _files(tmp_path, [])
    with caplog.at_level(logging.WARNING, logger="odtk"):
        results = evaluate(gt, dt)
    assert results["AP"] == results["AP50"] == 0.0 and "no detections" in results["table"]
    assert capsys.readouterr().out == "" and "no detections" in caplog.text
