"""odtk._C's rotated kernels (iou_rotated, decode_rotated, nms_rotated) against odtk.rotated's PyTorch functions, on
a CUDA GPU with the extension built; the kernels' box geometry (odtk/csrc/cuda/rotated.h, compiled for the host with
g++) against odtk.rotated on any machine with a compiler; and the one-line errors where the kernels are missing."""
import ctypes
import math
import os
import shutil
import subprocess

import pytest
import torch

import odtk
from odtk import extension
from odtk.utils import OdtkError

try:
    from odtk import rotated
except ImportError:
    rotated = None

_C = extension.load()[0]
needs_rotated = pytest.mark.skipif(rotated is None, reason="odtk.rotated (the rotated box maths) is not in this odtk")
needs_kernels = pytest.mark.skipif(
    not (torch.cuda.is_available() and _C is not None and hasattr(_C, "iou_rotated")),
    reason="needs a CUDA GPU and odtk._C built with the rotated kernels (README: GPU / TensorRT)")
GEOMETRY = os.path.join(os.path.dirname(odtk.__file__), "csrc", "cuda", "rotated.h")


def random_boxes(n: int, seed: int, *, spread: float = 120.0) -> torch.Tensor:
    """Rotated boxes [n, 5] crowded enough to overlap often, with some degenerate (zero width or height) ones."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(n, 2, generator=g) * spread + 20
    sizes = torch.rand(n, 2, generator=g) * 50 + 1
    sizes[::17, 0] = 0                               # degenerate: IoU 0, never NaN
    theta = (torch.rand(n, generator=g) * 2 - 1) * math.pi
    return torch.cat([centres - sizes / 2, centres + sizes / 2, theta[:, None]], dim=1)


@pytest.fixture
def old_extension(monkeypatch):
    """An odtk._C built before the rotated kernels."""
    monkeypatch.setattr(extension, "_loaded", (type("Module", (), {"decode": None, "nms": None}), ""))


def test_missing_kernels_are_one_line_errors(monkeypatch, old_extension):
    boxes = torch.zeros(1, 5)
    with pytest.raises(OdtkError, match=r"odtk's compiled extension has no iou_rotated kernel \(it was built from an "
                                        r"older odtk\): rebuild it; build it inside NVIDIA's NGC PyTorch container"):
        extension.rotated_box_iou(boxes, boxes)
    with pytest.raises(OdtkError, match="has no nms_rotated kernel"):
        extension.nms_rotated(torch.zeros(1, 1), boxes[None], torch.zeros(1, 1))
    with pytest.raises(OdtkError, match="has no decode_rotated kernel"):
        extension.decode_rotated([torch.zeros(1, 1, 1, 1)], [torch.zeros(1, 6, 1, 1)], [boxes], [8])
    monkeypatch.setattr(extension, "_loaded", (None, "No module named 'odtk._C'"))
    with pytest.raises(OdtkError, match=r"odtk's CUDA kernels are not built \(No module named 'odtk._C'\)"):
        extension.rotated_box_iou(boxes, boxes)


@pytest.fixture(scope="module")
def host_iou(tmp_path_factory):
    """rotated.h's IoU compiled for the host: f(a [N, 5], b [M, 5]) -> [N, M] float32 (the kernels' operations)."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None or not os.path.isfile(GEOMETRY):
        pytest.skip("needs a C++ compiler (g++ or $CXX) and odtk/csrc/cuda/rotated.h")
    folder = tmp_path_factory.mktemp("geometry")
    (folder / "iou.cpp").write_text(
        '#include "rotated.h"\n'
        'extern "C" void iou(const float* a, int n, const float* b, int m, float* out) {\n'
        '  using namespace odtk::rotated;\n'
        '  for (int i = 0; i < n; ++i)\n'
        '    for (int j = 0; j < m; ++j) out[i * m + j] = iou(make_quad(a + 5 * i), make_quad(b + 5 * j));\n'
        '}\n')
    library = folder / "libiou.so"
    subprocess.run([compiler, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                    "-I", os.path.dirname(GEOMETRY), str(folder / "iou.cpp"), "-o", str(library)],
                   check=True, timeout=120)
    lib = ctypes.CDLL(str(library))

    def call(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.float().contiguous(), b.float().contiguous()
        out = torch.empty(a.shape[0], b.shape[0])
        pointer = ctypes.POINTER(ctypes.c_float)
        lib.iou(ctypes.cast(a.data_ptr(), pointer), a.shape[0], ctypes.cast(b.data_ptr(), pointer), b.shape[0],
                ctypes.cast(out.data_ptr(), pointer))
        return out
    return call


@needs_rotated
def test_kernel_geometry_equals_rotated_box_iou(host_iou):
    a, b = random_boxes(60, seed=1), random_boxes(50, seed=2)
    got, want = host_iou(a, b), rotated.rotated_box_iou(a, b)
    assert int((want > 0).sum()) > 300, "the test boxes must overlap"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    square = torch.tensor([[10.0, 10.0, 30.0, 30.0, 0.3]])
    turned = square.clone()
    turned[0, 4] += math.pi / 2                      # a square a quarter-turn further is the same square
    far = square + torch.tensor([[100.0, 0, 100, 0, 0]])
    flat = torch.tensor([[10.0, 10.0, 30.0, 10.0, 0.3]])
    torch.testing.assert_close(host_iou(square, torch.cat([square, turned, far, flat])),
                               torch.tensor([[1.0, 1.0, 0.0, 0.0]]), rtol=0, atol=1e-6)


@needs_kernels
@needs_rotated
def test_cuda_iou_rotated_equals_rotated_box_iou():
    a, b = random_boxes(300, seed=3), random_boxes(200, seed=4)
    got = _C.iou_rotated(a.cuda(), b.cuda())
    assert got.shape == (300, 200) and not bool(got.isnan().any())
    torch.testing.assert_close(got.cpu(), rotated.rotated_box_iou(a, b), rtol=0, atol=1e-4)
    assert _C.iou_rotated(a[:0].cuda(), b.cuda()).shape == (0, 200)


@needs_kernels
@needs_rotated
@pytest.mark.parametrize("top_n, image_size", [(1000, (100, 140)), (50, None)])
def test_cuda_decode_rotated_equals_decode_rotated(top_n, image_size):
    cell = rotated.generate_anchors_rotated(8, [1.0, 2.0, 0.5], [4, 5.04], [-math.pi / 6, 0.0, math.pi / 6])
    g = torch.Generator().manual_seed(5)
    batch, num_anchors, classes, height, width = 2, cell.shape[0], 3, 13, 17
    logits = torch.randn(batch, num_anchors * classes, height, width, generator=g) * 2 - 3
    deltas = torch.randn(batch, num_anchors * 6, height, width, generator=g) * 0.5
    probs = logits.sigmoid()                         # one sigmoid for both sides
    anchors = rotated.grid_anchors_rotated(cell, 8, height, width)
    batch_idx, scores, boxes, labels = rotated.decode_rotated([logits], [deltas], [anchors], threshold=0.05,
                                                              top_n=top_n, image_size=image_size)
    h, w = image_size or (0, 0)
    gpu = _C.decode_rotated(probs.cuda(), deltas.cuda(), cell.cuda(), 8.0, 0.05, top_n, h, w)
    assert gpu[1].shape == (batch, top_n, 5)
    for b in range(batch):
        keep = batch_idx == b
        n = int(keep.sum())
        assert n > 0 and int((gpu[0][b] > 0).sum()) == n, f"image {b}: another count of candidates"
        torch.testing.assert_close(gpu[0][b][:n].cpu(), scores[keep])          # same candidates, same order
        assert torch.equal(gpu[2][b][:n].long().cpu(), labels[keep])
        torch.testing.assert_close(gpu[1][b][:n].cpu(), boxes[keep], rtol=1e-5, atol=1e-3)


@needs_kernels
@needs_rotated
@pytest.mark.parametrize("count, detections", [(400, 100), (300, 1000)])
def test_cuda_nms_rotated_keeps_the_same_boxes(count, detections):
    batch = 2
    boxes = torch.stack([random_boxes(count, seed=10 + b, spread=60) for b in range(batch)])
    g = torch.Generator().manual_seed(count)
    scores = torch.rand(batch, count, generator=g) * 0.95 + 0.05
    scores[:, count - count // 5:] = 0              # decode's zero padding
    classes = torch.randint(0, 3, (batch, count), generator=g).float()
    valid = scores > 0
    batch_idx = torch.arange(batch)[:, None].expand(-1, count)[valid]
    cpu = rotated.nms_rotated(batch_idx, scores[valid], boxes[valid], classes[valid].long(), batch,
                              iou_threshold=0.5, detections=detections)
    gpu = _C.nms_rotated(scores.cuda(), boxes.cuda(), classes.cuda(), 0.5, detections)
    assert gpu[1].shape == (batch, detections, 5)
    for b in range(batch):
        n = int((cpu[0][b] > 0).sum())
        assert 0 < n < int(valid[b].sum()), "the test data must make NMS drop boxes"
        assert torch.equal(gpu[0][b].cpu(), cpu[0][b]) and torch.equal(gpu[1][b].cpu(), cpu[1][b])
        assert torch.equal(gpu[2][b].long().cpu(), cpu[2][b])
