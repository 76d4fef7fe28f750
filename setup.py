from setuptools import setup

# Three import packages from one repo: the shared level-set core at the root and the two
# Detectron2 projects, laid out like detectron2's own projects/ folder.
setup(
    name="deep-levelset",
    version="0.1.0",
    description="LevelSet R-CNN and DELSE for Detectron2, on one shared level-set core",
    python_requires=">=3.8",
    packages=["levelset", "levelset_rcnn", "delse"],
    package_dir={
        "levelset": "levelset",
        "levelset_rcnn": "projects/LevelSetRCNN/levelset_rcnn",
        "delse": "projects/DELSE/delse",
    },
    install_requires=["torch", "torchvision", "numpy", "scipy", "opencv-python-headless", "pycocotools"],
)
