"""odtk: RetinaNet object detection toolkit (train, infer, evaluate, export).

    >>> import odtk
    >>> detector = odtk.Detector.load("model.pth")          # .pth, .onnx or .plan
    >>> found = detector("photo.jpg")                        # boxes, scores, labels, names
    >>> odtk.train(odtk.TrainConfig(model="new.pth", annotations="train.json", images="images/"))
    >>> odtk.export(odtk.ExportConfig(model="new.pth", output="new.onnx"))
    >>> rows = odtk.benchmark(odtk.BenchmarkConfig(model="new.pth", images="val/", annotations="val.json"))
    >>> odtk.info("new.pth")["gflops"]                     # classes, anchors, parameters, GFLOPs, training
"""
from .version import __version__
from . import constants  # noqa: F401  before torch is imported: constants.LOADED is the start-up's time
from .benchmark import BenchmarkConfig, benchmark, benchmark_table
from .convert import convert_voc, convert_yolo, write_coco
from .data import Augment
from .detector import Detections, Detector
from .evaluate import evaluate
from .export import ExportConfig, export
from .infer import InferConfig, infer
from .info import info
from .model import Model, ModelConfig
from .train import TrainConfig, train
from .utils import OdtkError

__all__ = ["__version__", "Detector", "Detections", "Model", "ModelConfig", "train", "TrainConfig", "Augment",
           "export", "ExportConfig", "infer", "InferConfig", "evaluate", "convert_voc", "convert_yolo", "write_coco",
           "info", "OdtkError", "benchmark", "BenchmarkConfig", "benchmark_table"]
