"""Values shared by several odtk modules, defined once: preprocessing, export, file types and the SSD crop."""
import time
from typing import List, Optional, Sequence

# when odtk was imported (odtk/__init__ imports this module before torch): `odtk train --time-budget` counts the
# start-up in its minutes
LOADED = time.time()

# torchvision's ImageNet statistics (RGB, [0, 1] scale): the backbones' pretrained weights expect them
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ONNX opset of the exported graphs (older ones lack ops they use; `odtk export --opset` refuses them)
DEFAULT_OPSET = 17

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# SSD's random crop as ODTK's DALI pipeline set up fn.random_bbox_crop; the PyTorch and DALI loaders both use these
CROP_THRESHOLDS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)    # minimum IoU of the crop with at least one box
CROP_SCALING = (0.3, 1.0)                           # each crop side as a fraction of the image side
CROP_ASPECT = (0.5, 2.0)                            # crop width / height, in pixels
CROP_ATTEMPTS = 50                                  # windows tried per threshold before drawing another


def category_ids_or_default(category_ids: Optional[Sequence[int]], num_classes: int) -> List[int]:
    """The dataset category id of each class index: `category_ids`, or 1..num_classes (COCO's first ids) for a
    model that was built without them."""
    return list(category_ids) if category_ids else list(range(1, num_classes + 1))
