from setuptools import find_packages, setup

setup(
    name="odtk",
    version="0.1.0",
    description="RetinaNet object detection toolkit: train, infer, evaluate and export on CPU or GPU",
    packages=find_packages(include=["odtk", "odtk.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "torchvision>=0.16", "pycocotools", "pillow", "numpy", "tqdm", "requests",
                      "tensorboardX"],
    extras_require={
        "test": ["pytest", "onnx", "onnxruntime", "onnxscript", "nvidia-dali-cuda130"],
        "onnx": ["onnx", "onnxruntime", "onnxscript"],
        "dali": ["nvidia-dali-cuda130"],
    },
    entry_points={"console_scripts": ["odtk=odtk.main:main"]},
)
