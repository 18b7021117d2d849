"""odtk: RetinaNet object detection toolkit (train, infer, evaluate, export)."""
__version__ = "0.1.0"
