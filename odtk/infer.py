"""Inference over a folder or a COCO file: COCO detections JSON, and COCO AP when annotated."""
import json
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from tqdm import tqdm

from .data import CocoDataset, make_loader
from .evaluate import evaluate
from .model import Model
from .utils import OdtkError, atomic_write_text, cpu_threads, log


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


def infer(cfg: InferConfig) -> Dict[str, float]:
    ext = os.path.splitext(cfg.model)[1].lower()
    if ext in (".onnx", ".plan"):
        raise OdtkError(f"{cfg.model}: {ext} inference is not implemented yet (this build runs .pth models)")
    model, _ = Model.load(cfg.model)
    return run_model(model, cfg)


def run_model(model: Model, cfg: InferConfig) -> Dict[str, float]:
    """Run a loaded PyTorch model over cfg's images; write detections; evaluate when annotated."""
    mc = model.config
    category_ids = mc.category_ids or list(range(1, mc.num_classes + 1))
    dataset = CocoDataset(cfg.images, cfg.annotations, resize=cfg.resize, max_size=cfg.max_size,
                          category_ids=category_ids, mean=mc.mean, std=mc.std)
    if mc.class_names and dataset.class_names:
        for cat_id, name in zip(category_ids, mc.class_names):
            if dataset.class_names.get(cat_id, name) != name:
                raise OdtkError(f"{cfg.annotations}: category {cat_id} is '{dataset.class_names[cat_id]}' but the "
                                f"model's is '{name}' (convert every split with the same --class-names)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads())
    model = model.to(device).eval()
    loader = make_loader(dataset, batch_size=cfg.batch, training=False, workers=cfg.loader_workers,
                         size_divisible=mc.size_divisible)
    amp = device.type == "cuda" and not cfg.full_precision
    results, count, start = [], 0, time.time()
    with torch.inference_mode(), tqdm(total=len(dataset), desc="infer", unit="img", dynamic_ncols=True) as bar:
        for batch in loader:
            if batch is None:
                continue
            images, _, _, ids, ratios = batch
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                heads = model(images)
            scores, boxes, classes = model.detect(([h.float() for h in heads[0]], [h.float() for h in heads[1]]),
                                                  tuple(images.shape[-2:]))
            results += to_coco(scores.cpu(), boxes.cpu(), classes.cpu(), ids, ratios, category_ids)
            count += len(ids)
            bar.update(len(ids))
    elapsed = time.time() - start
    atomic_write_text(json.dumps(results), cfg.output)
    log.info(f"{count} images, {len(results)} detections in {elapsed:.1f}s ({count / max(elapsed, 1e-9):.2f} im/s) "
             f"-> {cfg.output}")
    if cfg.annotations:
        return evaluate(cfg.annotations, cfg.output)
    return {}
