"""odtk: RetinaNet object detection toolkit (train, infer, evaluate, export).

    >>> import odtk
    >>> detector = odtk.Detector.load("model.pth")          # .pth, .onnx or .plan
    >>> found = detector("photo.jpg")                        # boxes, scores, labels, names
    >>> odtk.train(odtk.TrainConfig(model="new.pth", annotations="train.json", images="images/"))
    >>> odtk.export(odtk.ExportConfig(model="new.pth", output="new.onnx"))
"""
__version__ = "0.1.0"   # the one version string: setup.py reads it from here

from .convert import convert_voc, convert_yolo, write_coco  # noqa: E402
from .data import Augment  # noqa: E402
from .detector import Detections, Detector  # noqa: E402
from .evaluate import evaluate  # noqa: E402
from .export import ExportConfig, export  # noqa: E402
from .infer import InferConfig, infer  # noqa: E402
from .model import Model, ModelConfig  # noqa: E402
from .train import TrainConfig, train  # noqa: E402
from .utils import OdtkError  # noqa: E402

__all__ = ["__version__", "Detector", "Detections", "Model", "ModelConfig", "train", "TrainConfig", "Augment",
           "export", "ExportConfig", "infer", "InferConfig", "evaluate", "convert_voc", "convert_yolo", "write_coco",
           "OdtkError"]
