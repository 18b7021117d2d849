"""Inference over a folder or a COCO file with a .pth (PyTorch), .onnx (ONNX Runtime) or .plan (TensorRT) model:
COCO detections JSON, and COCO AP when annotated."""
import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from .data import CocoDataset, loader_factory
from .distributed import Context, gather
from .evaluate import evaluate
from .model import Model
from .utils import OdtkError, atomic_write_text, cpu_threads, log

Predict = Callable[[Tensor], Tuple[Tensor, Tensor, Tensor]]


@dataclass
class InferConfig:
    model: str
    images: str = "."
    annotations: Optional[str] = None
    output: str = "detections.json"
    batch: int = 2
    resize: int = 800
    max_size: int = 1333
    full_precision: bool = False
    loader_workers: int = 2
    with_dali: bool = False
    verbose: bool = False


def to_coco(scores, boxes, classes, image_ids, ratios, category_ids: List[int]) -> List[dict]:
    """Model outputs (input pixels) -> COCO result rows in original pixels and dataset category ids."""
    rows = []
    for s, b, c, image_id, ratio in zip(scores, boxes, classes, image_ids.tolist(), ratios.tolist()):
        keep = s > 0
        b = (b[keep] / ratio).tolist()
        for score, (x1, y1, x2, y2), cls in zip(s[keep].tolist(), b, c[keep].tolist()):
            rows.append({"image_id": image_id, "category_id": category_ids[cls],
                         "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                         "score": round(score, 5)})
    return rows


def _check_names(cfg: InferConfig, dataset: CocoDataset, category_ids, class_names) -> None:
    if class_names and dataset.class_names:
        for cat_id, name in zip(category_ids, class_names):
            if dataset.class_names.get(cat_id, name) != name:
                raise OdtkError(f"{cfg.annotations}: category {cat_id} is '{dataset.class_names[cat_id]}' but the "
                                f"model's is '{name}' (convert every split with the same --class-names)")


def run(predict: Predict, dataset: CocoDataset, cfg: InferConfig, category_ids: List[int],
        size_divisible: int = 32, ctx: Context = Context()) -> Dict[str, float]:
    """The shared loop: batches -> predict -> COCO rows -> JSON (atomically) -> evaluation.
    Distributed: each rank takes its shard, rank 0 gathers, writes and evaluates (other ranks return {})."""
    loader = loader_factory(cfg.with_dali)(dataset, batch_size=cfg.batch, training=False,
                                           workers=cfg.loader_workers, size_divisible=size_divisible,
                                           rank=ctx.rank, world_size=ctx.world_size)
    results, count, start = [], 0, time.time()
    shard = len(range(ctx.rank, len(dataset), ctx.world_size))
    bar = tqdm(total=shard, desc="infer", unit="img", dynamic_ncols=True, disable=ctx.rank != 0)
    with bar:
        for batch in loader:
            if batch is None:
                continue
            images, _, _, ids, ratios = batch
            scores, boxes, classes = predict(images)
            results += to_coco(scores, boxes, classes, ids, ratios, category_ids)
            count += len(ids)
            bar.update(len(ids))
    elapsed = time.time() - start
    if ctx.distributed:
        results, count = gather(results, ctx), sum(gather([count], ctx))
        if ctx.rank:
            return {}
    atomic_write_text(json.dumps(results), cfg.output)
    log.info(f"{count} images, {len(results)} detections in {elapsed:.1f}s ({count / max(elapsed, 1e-9):.2f} im/s) "
             f"-> {cfg.output}")
    if cfg.annotations:
        ap = evaluate(cfg.annotations, cfg.output)
        print(ap["table"])
        return ap
    return {}


def torch_predictor(model: Model, *, amp: bool) -> Predict:
    device = next(model.parameters()).device

    @torch.inference_mode()
    def predict(images: Tensor):
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            heads = model(images)
        heads = ([h.float() for h in heads[0]], [h.float() for h in heads[1]])
        return tuple(t.cpu() for t in model.detect(heads, tuple(images.shape[-2:])))
    return predict


def run_model(model: Model, cfg: InferConfig, ctx: Optional[Context] = None) -> Dict[str, float]:
    """Run a loaded PyTorch model over cfg's images; write detections; evaluate when annotated.
    With `ctx` (from training) the worker's device and threads are kept and the images are sharded."""
    mc = model.config
    category_ids = mc.category_ids or list(range(1, mc.num_classes + 1))
    dataset = CocoDataset(cfg.images, cfg.annotations, resize=cfg.resize, max_size=cfg.max_size,
                          category_ids=category_ids, mean=mc.mean, std=mc.std)
    _check_names(cfg, dataset, category_ids, mc.class_names)
    device = ctx.device if ctx else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and ctx is None:
        torch.set_num_threads(cpu_threads())
    model = model.to(device).eval()
    amp = device.type == "cuda" and not cfg.full_precision
    return run(torch_predictor(model, amp=amp), dataset, cfg, category_ids, mc.size_divisible, ctx or Context())


def onnx_session(path: str):
    """An ONNX Runtime session on CUDA when available, else on every CPU core."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise OdtkError(f"{path}: ONNX inference needs onnxruntime (pip install 'odtk[onnx]')") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.log_severity_level = 3       # errors only: ORT's graph clean-up notes are not the user's business
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except Exception as e:
        raise OdtkError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None


def run_onnx(cfg: InferConfig) -> Dict[str, float]:
    from .onnx_meta import read_metadata
    meta = read_metadata(cfg.model)
    if meta["flavour"] != "end2end":
        raise OdtkError(f"{cfg.model}: a raw-heads ONNX (for TensorRT) has no decode/NMS; export the default "
                        f"end-to-end graph for ONNX Runtime: odtk export model.pth model.onnx")
    session = onnx_session(cfg.model)
    category_ids = meta["category_ids"]
    dataset = CocoDataset(cfg.images, cfg.annotations, fit=tuple(meta["size"]), category_ids=category_ids,
                          mean=meta["mean"], std=meta["std"])
    _check_names(cfg, dataset, category_ids, meta.get("class_names"))
    log.info(f"ONNX Runtime {session.get_providers()[0]}, input {meta['size'][0]}x{meta['size'][1]}")

    def predict(images: Tensor):
        scores, boxes, classes = session.run(None, {"input_1": np.ascontiguousarray(images.numpy())})
        return torch.from_numpy(scores), torch.from_numpy(boxes), torch.from_numpy(classes)
    return run(predict, dataset, cfg, category_ids)


def plan_predictor(engine, device: torch.device) -> Predict:
    """A TensorRT engine (odtk._C.Engine) as a predict function: CPU batch in, CPU (scores, boxes, classes) out."""
    def predict(images: Tensor):
        scores, boxes, classes = engine.infer(images.to(device, non_blocking=True).contiguous())
        return scores.cpu(), boxes.cpu(), classes.long().cpu()
    return predict


def run_plan(cfg: InferConfig) -> Dict[str, float]:
    from .extension import engine_class
    engine_type = engine_class()
    if not torch.cuda.is_available():
        raise OdtkError(f"{cfg.model}: TensorRT engines run on a CUDA GPU and none is available")
    try:
        engine = engine_type.load(cfg.model, cfg.verbose)
    except RuntimeError as e:
        raise OdtkError(f"{cfg.model}: {str(e).splitlines()[0][:300]}") from None
    meta = json.loads(engine.metadata)
    if cfg.batch > engine.max_batch:
        raise OdtkError(f"--batch {cfg.batch}: the engine takes at most {engine.max_batch} images "
                        f"(export with --batch or --dynamic-batch-opts)")
    category_ids = meta["category_ids"]
    dataset = CocoDataset(cfg.images, cfg.annotations, fit=tuple(engine.input_size), category_ids=category_ids,
                          mean=meta["mean"], std=meta["std"])
    _check_names(cfg, dataset, category_ids, meta.get("class_names"))
    log.info(f"TensorRT {meta.get('precision', '')} engine, input {engine.input_size[0]}x{engine.input_size[1]}")
    return run(plan_predictor(engine, torch.device("cuda")), dataset, cfg, category_ids)


def infer(cfg: InferConfig) -> Dict[str, float]:
    ext = os.path.splitext(cfg.model)[1].lower()
    if ext == ".onnx":
        if not os.path.isfile(cfg.model):
            raise OdtkError(f"{cfg.model}: model file not found")
        return run_onnx(cfg)
    if ext == ".plan":
        if not os.path.isfile(cfg.model):
            raise OdtkError(f"{cfg.model}: model file not found")
        return run_plan(cfg)
    model, _ = Model.load(cfg.model)
    return run_model(model, cfg)
