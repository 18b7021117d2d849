"""See what the model found: drawn detections (odtk.draw), `odtk infer --save-images`, and inputs beyond a folder
(one image, a glob, a .txt list, a video)."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from odtk.detector import Detections, Detector
from odtk.draw import (GROUND_TRUTH_COLOR, class_color, draw_detections, font_size, label_rect, line_width,
                       load_font, pixel_boxes)
from odtk.main import main

CLASSES = ["square", "circle", "triangle"]
SMALL = ["--resize", "128", "--max-size", "128", "--loader-workers", "0"]


def _detections(boxes, scores, names, size):
    return Detections(boxes=torch.tensor(boxes, dtype=torch.float32), scores=torch.tensor(scores),
                      labels=torch.tensor([CLASSES.index(n) + 1 for n in names]), names=names, image_size=size)


def _band(box, width, shape) -> np.ndarray:
    """The pixels of a box's outline: `width` pixels inside its edges (as PIL draws it)."""
    mask = np.zeros(shape, bool)
    x1, y1, x2, y2 = box
    mask[y1:y2 + 1, x1:x2 + 1] = True
    mask[y1 + width:y2 + 1 - width, x1 + width:x2 + 1 - width] = False
    return mask


def _rect(rect, shape) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[rect[1]:rect[3] + 1, rect[0]:rect[2] + 1] = True
    return mask


def _noise(height, width, seed=0) -> torch.Tensor:
    """A textured image: a pixel left alone is recognisably the same."""
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_only_the_drawn_outlines_and_labels_change():
    height, width = 240, 320
    image = _noise(height, width)
    found = _detections([[20, 60, 120, 200], [150.6, 40.2, 230.9, 120.7], [250, 150, 310, 230], [160, 170, 230, 220]],
                        [0.9, 0.8, 0.5, 0.1], ["square", "square", "circle", "triangle"], (height, width))
    drawn = draw_detections(image, found, class_names=CLASSES, threshold=0.3)
    assert drawn.dtype == torch.uint8 and drawn.shape == image.shape
    assert torch.equal(image, _noise(height, width))      # a copy: the input is left alone
    changed = (drawn != image).any(0).numpy()
    lw, font = line_width(height, width), load_font(font_size(height, width))
    boxes = pixel_boxes(found.boxes[:3], height, width).tolist()      # the 4th is under the threshold
    texts = ["square 0.90", "square 0.80", "circle 0.50"]
    bands = [_band(b, lw, changed.shape) for b in boxes]
    labels = [_rect(label_rect(b, t, font, height, width), changed.shape) for b, t in zip(boxes, texts)]
    allowed = np.logical_or.reduce(bands + labels)
    assert not changed[~allowed].any()                     # nothing outside the outlines and labels
    pixels = drawn.permute(1, 2, 0).numpy()
    for band, name in zip(bands, ["square", "square", "circle"]):
        outline = band & ~np.logical_or.reduce(labels)
        assert (pixels[outline] == class_color(CLASSES.index(name))).all()   # every outline pixel, its colour
    for label in labels:
        assert changed[label].mean() > 0.5                 # a filled label background
    assert not changed[_band([160, 170, 230, 220], lw, changed.shape) & ~allowed].any()


def test_colours_are_fixed_per_class_and_ground_truth_is_white():
    image = torch.full((3, 100, 100), 90, dtype=torch.uint8)
    one = draw_detections(image, _detections([[10, 40, 40, 90]], [0.7], ["circle"], (100, 100)), class_names=CLASSES)
    other = draw_detections(image, _detections([[60, 40, 95, 90]], [0.4], ["circle"], (100, 100)),
                            class_names=CLASSES)
    assert tuple(one[:, 60, 10].tolist()) == tuple(other[:, 60, 60].tolist()) == class_color(1)
    assert len({class_color(i) for i in range(3)}) == 3 and GROUND_TRUTH_COLOR not in {class_color(i)
                                                                                     for i in range(20)}
    truth = (torch.tensor([[60.0, 40, 95, 90]]), ["square"])
    both = draw_detections(image, _detections([[10, 40, 40, 90]], [0.7], ["circle"], (100, 100)),
                           class_names=CLASSES, ground_truth=truth)
    assert tuple(both[:, 60, 60].tolist()) == GROUND_TRUTH_COLOR       # a miss: a white box alone
    assert tuple(both[:, 60, 10].tolist()) == class_color(1)
    assert line_width(100, 100) == 2 and line_width(1080, 1920) == 4 and font_size(1080, 1920) == 16


def _near_edges(points, distance, shape) -> np.ndarray:
    """The pixels whose centre lies within `distance` of a polygon's edges (points [K, 2])."""
    ys, xs = np.mgrid[:shape[0], :shape[1]] + 0.5
    near = np.zeros(shape, bool)
    for a, b in zip(points, np.roll(points, -1, axis=0)):
        t = (((xs - a[0]) * (b[0] - a[0]) + (ys - a[1]) * (b[1] - a[1])) / ((b - a) ** 2).sum()).clip(0, 1)
        near |= np.hypot(xs - a[0] - t * (b[0] - a[0]), ys - a[1] - t * (b[1] - a[1])) <= distance
    return near


def _along_edges(points, depth):
    """Pixels (x, y) `depth` pixels inside a convex polygon's edges (points [K, 2]), along the middle of each."""
    for a, b in zip(points, np.roll(points, -1, axis=0)):
        inward = np.array([a[1] - b[1], b[0] - a[0]]) / np.hypot(*(b - a))
        inward *= np.sign(inward @ (points.mean(0) - a))
        for f in np.linspace(0.25, 0.75, 9):
            x, y = a + f * (b - a) + depth * inward
            yield int(x), int(y)


def test_rotated_boxes_are_drawn_as_polygons():
    """A rotated detection is its corner polygon, labelled above its top-most corner; its enclosing box's
    corners stay untouched. Rotated ground truth: a white polygon labelled below its bottom-most corner."""
    from odtk.draw import corner_anchor
    from odtk.rotated import corners, enclosing_boxes
    height, width = 120, 160
    image = torch.full((3, height, width), 90, dtype=torch.uint8)
    box = torch.tensor([[40.0, 50.0, 120.0, 70.0, 0.5]])        # 80 x 20, turned ~29 degrees counter-clockwise
    truth = torch.tensor([[5.0, 6.0, 35.0, 14.0, -0.4]])          # clear of the detection and its label
    found = Detections(boxes=box, scores=torch.tensor([0.9]), labels=torch.tensor([2]), names=["circle"],
                       image_size=(height, width))
    drawn = draw_detections(image, found, class_names=CLASSES, ground_truth=(truth, ["square"]))
    changed = (drawn != image).any(0).numpy()
    pixels = drawn.permute(1, 2, 0).numpy()
    lw, font = line_width(height, width), load_font(font_size(height, width))
    points, truth_points = corners(box.double())[0].numpy(), corners(truth.double())[0].numpy()
    label = _rect(label_rect(corner_anchor(points.tolist(), height, width), "circle 0.90", font, height, width),
                  changed.shape)
    truth_label = _rect(label_rect(corner_anchor(truth_points.tolist(), height, width, below=True), "square", font,
                                   height, width, below=True), changed.shape)
    allowed = _near_edges(points, lw + 1, changed.shape) | _near_edges(truth_points, lw, changed.shape)
    assert not changed[~(allowed | label | truth_label)].any()      # only the outlines and the labels
    assert changed[label].mean() > 0.5 and changed[truth_label].mean() > 0.5
    assert label[int(points[:, 1].min()) - 2, int(points[np.argmin(points[:, 1]), 0])]   # above the top corner
    assert truth_label[int(truth_points[:, 1].max()) + 2, int(truth_points[np.argmax(truth_points[:, 1]), 0])]
    for x, y in _along_edges(points, 1.0):                  # the 2-pixel outline: a pixel inside each edge
        assert tuple(pixels[y, x]) == class_color(1)
    for x, y in _along_edges(truth_points, 0.5):            # the 1-pixel one: beside the point (Pillow's rounding)
        assert (pixels[y - 1:y + 2, x - 1:x + 2] == GROUND_TRUTH_COLOR).all(-1).any()
    x1, y1, x2, y2 = enclosing_boxes(box)[0].tolist()
    for x, y in ((x1 + 2, y1 + 2), (x2 - 2, y1 + 2), (x2 - 2, y2 - 2), (x1 + 2, y2 - 2)):
        assert not changed[int(y), int(x)]                  # the enclosing box's corners are not drawn


def test_unrotated_rows_draw_as_boxes_do():
    """theta 0: the polygon, its label and the ground truth's are exactly the axis-aligned drawing."""
    image = _noise(100, 140, seed=3)
    boxes, truth = [[10.4, 20.7, 70.2, 60.9], [80, 5, 130, 90]], [[30.5, 40.5, 90.2, 95.0]]
    plain = draw_detections(image, _detections(boxes, [0.9, 0.6], ["square", "circle"], (100, 140)),
                            class_names=CLASSES, ground_truth=(torch.tensor(truth), ["triangle"]))
    turned = [[*b, 0.0] for b in boxes]
    rotated = draw_detections(image, _detections(turned, [0.9, 0.6], ["square", "circle"], (100, 140)),
                              class_names=CLASSES, ground_truth=(torch.tensor([[*truth[0], 0.0]]), ["triangle"]))
    assert torch.equal(rotated, plain)


def test_the_trained_model_draws_its_detections(trained):
    model, images, _, _, _ = trained
    from odtk.detector import to_uint8
    path = os.path.join(images, sorted(os.listdir(images))[0])
    detector = Detector.load(model)
    found = detector(path, resize=128, max_size=128)
    image = to_uint8(path)
    drawn = draw_detections(image, found, class_names=detector.class_names, threshold=0.0)
    h, w = found.image_size
    for box, name in zip(pixel_boxes(found.boxes, h, w).tolist()[-1:], found.names[-1:]):  # drawn last: on top
        x1, y1, x2, y2 = box
        assert tuple(drawn[:, y2, (x1 + x2) // 2].tolist()) == class_color(detector.class_names.index(name))
    assert len(found) > 0 and not torch.equal(drawn, image)


def _run(tmp_path, name, model, *args):
    out = str(tmp_path / f"{name}.json")
    assert main(["infer", model, "--output", out, *SMALL, *args]) == 0
    return json.load(open(out))


def test_save_images_writes_one_jpeg_per_image_and_the_same_json(trained, tmp_path):
    from odtk.infer import InferConfig, infer
    model, images, train_json, _, _ = trained
    val_json = os.path.join(os.path.dirname(train_json), "val.json")
    plain = infer(InferConfig(model=model, images=images, annotations=val_json, output=str(tmp_path / "a.json"),
                              resize=128, max_size=128, loader_workers=0))
    drawn_dir = tmp_path / "drawn"
    drawn = infer(InferConfig(model=model, images=images, annotations=val_json, output=str(tmp_path / "b.json"),
                              resize=128, max_size=128, loader_workers=0, save_images=str(drawn_dir),
                              draw_ground_truth=True, draw_threshold=0.2))
    assert open(tmp_path / "a.json").read() == open(tmp_path / "b.json").read()
    assert drawn["AP"] == plain["AP"]
    files = [im["file_name"] for im in json.load(open(val_json))["images"]]
    assert sorted(os.listdir(drawn_dir)) == sorted(files) and all(f.endswith(".jpg") for f in files)
    for name in files:
        with Image.open(drawn_dir / name) as im, Image.open(os.path.join(images, name)) as original:
            assert im.format == "JPEG" and im.size == original.size
            assert np.abs(np.asarray(im, np.int16) - np.asarray(original.convert("RGB"), np.int16)).max() > 100


def test_drawing_mistakes_are_one_line(trained, tmp_path, caplog):
    model, images, train_json, _, _ = trained
    out = str(tmp_path / "d.json")
    for argv, message in [
        (["--images", images, "--save-images", images], "would replace the input image; give another folder"),
        (["--images", images, "--draw-ground-truth", "--save-images", str(tmp_path)], "give --annotations too"),
        (["--images", images, "--annotations", train_json, "--draw-ground-truth"], "give --save-images DIR too"),
        (["--images", images, "--draw-threshold", "1.5"], "--draw-threshold 1.5: must be between 0 and 1"),
        (["--images", os.path.join(images, "*.jpg"), "--annotations", train_json], "give the folder"),
        (["--images", str(tmp_path / "none.txt")], "none.txt: list file not found"),
    ]:
        caplog.clear()
        assert main(["infer", model, "--output", out, *SMALL, *argv]) == 2, argv
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], (argv, errors)
    assert not os.path.exists(out)


def test_a_list_a_glob_and_one_image_give_the_folders_detections(trained, tmp_path):
    model, all_images, _, _, _ = trained
    images = tmp_path / "four"
    images.mkdir()
    names = sorted(os.listdir(all_images))[:4]
    for name in names:
        (images / name).write_bytes(open(os.path.join(all_images, name), "rb").read())
    images = str(images)
    folder = _run(tmp_path, "folder", model, "--images", images)
    pattern = _run(tmp_path, "glob", model, "--images", os.path.join(images, "*.jpg"), "--save-images",
                   str(tmp_path / "drawn"))
    listing = tmp_path / "lists" / "images.txt"
    listing.parent.mkdir()
    rel = os.path.relpath(images, listing.parent)
    listing.write_text("# the synthetic images\n\n" + "".join(f"{os.path.join(rel, n)}\n" for n in names))
    listed = _run(tmp_path, "list", model, "--images", str(listing))
    one = _run(tmp_path, "one", model, "--images", os.path.join(images, names[0]))
    assert len(folder) > 0
    for rows in (pattern, listed):
        assert [(r["image_id"], r["category_id"]) for r in rows] == [(r["image_id"], r["category_id"])
                                                                      for r in folder]
        assert np.allclose([r["bbox"] + [r["score"]] for r in rows], [r["bbox"] + [r["score"]] for r in folder],
                           atol=1e-4)
    first = [r for r in folder if r["image_id"] == 1]
    assert [r["category_id"] for r in one] == [r["category_id"] for r in first]
    # alone, not in a batch of 2: the same boxes to the rounding of the JSON (0.01 px)
    assert np.allclose([r["bbox"] for r in one], [r["bbox"] for r in first], atol=0.011)
    assert sorted(os.listdir(tmp_path / "drawn")) == names          # one JPEG per globbed image, its own name


def _write_video(path: str, *, frames: int = 20, fps: int = 10, size=(64, 80)) -> None:
    """A video of a white rectangle moving right over grey, written with PyAV."""
    av = pytest.importorskip("av")
    height, width = size
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 80, np.uint8)
            image[20:44, 2 + 2 * i:26 + 2 * i] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))


def _read_video(path: str):
    import av
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate, stream.codec_context.name


def test_a_video_gives_an_annotated_video_and_one_json_line_per_frame(trained, tmp_path, monkeypatch):
    model, _, _, _, _ = trained
    clip = str(tmp_path / "clip.mp4")
    _write_video(clip)
    monkeypatch.chdir(tmp_path)
    assert main(["infer", model, "--images", clip, "--save-images", "seen", "--draw-threshold", "0.05",
                 "--batch", "8", *SMALL]) == 0
    lines = [json.loads(line) for line in open(tmp_path / "clip.detections.jsonl")]
    assert [line["frame"] for line in lines] == list(range(20))
    assert [line["time"] for line in lines] == pytest.approx([i / 10 for i in range(20)])
    for d in (d for line in lines for d in line["detections"]):
        assert set(d) == {"bbox", "score", "category_id", "name"} and d["name"] in CLASSES
    frames, fps, codec = _read_video(str(tmp_path / "seen" / "clip.mp4"))
    assert len(frames) == 20 and frames[0].shape == (64, 80, 3) and fps == 10 and codec == "h264"
    # the Python API: the same detections, frame by frame
    found = Detector.load(model).predict_video(clip, resize=128, max_size=128, output_video=str(tmp_path / "a.mp4"))
    assert [f.frame for f in found] == list(range(20)) and len(_read_video(str(tmp_path / "a.mp4"))[0]) == 20
    assert [f.to_frame() for f in found] == lines


def test_without_pyav_a_video_is_one_line(trained, tmp_path, monkeypatch, caplog):
    model, _, _, _, _ = trained
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"never decoded: PyAV is checked first")
    clip = str(clip)
    monkeypatch.setitem(sys.modules, "av", None)         # `import av` now raises ImportError
    assert main(["infer", model, "--images", clip, "--output", str(tmp_path / "d.jsonl"), *SMALL]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"odtk infer: error: {clip}: video needs PyAV: pip install 'odtk[video]'"]
    assert not os.path.exists(tmp_path / "d.jsonl")
