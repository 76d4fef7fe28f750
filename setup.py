from setuptools import setup

# Four import packages from one repo: the shared level-set core (pure PyTorch) and the shared
# Detectron2 layer at the root, and the two Detectron2 projects, laid out like detectron2's own
# projects/ folder. The entry points let levelset_d2.get_cfg() declare every installed project's keys.
setup(
    name="deep-levelset",
    version="0.1.0",
    description="LevelSet R-CNN and DELSE for Detectron2, on one shared level-set core",
    python_requires=">=3.10",  # as the README states
    packages=["levelset", "levelset_d2", "levelset_rcnn", "delse"],
    package_dir={
        "levelset": "levelset",
        "levelset_d2": "levelset_d2",
        "levelset_rcnn": "projects/LevelSetRCNN/levelset_rcnn",
        "delse": "projects/DELSE/delse",
    },
    entry_points={
        "console_scripts": [  # the Label Studio ML backends (levelset_d2.label_studio_server)
            "delse-serve = delse.label_studio:main",  # interactive: DELSE from clicks
            "levelset-rcnn-serve = levelset_rcnn.label_studio:main",  # pre-annotation: LevelSet R-CNN
        ],
        "levelset_d2.config": [
            "levelset_rcnn = levelset_rcnn:add_levelset_rcnn_config",
            "delse = delse:add_delse_config",
        ],
    },
    # What the four packages import (requirements.txt pins the tested versions). detectron2 is not on
    # PyPI: tools/setup/setup_env.sh installs it (README, "Setup").
    install_requires=["torch", "torchvision", "numpy", "scipy", "scikit-image", "opencv-python-headless",
                      "pycocotools", "Pillow", "fvcore", "flask", "waitress", "requests"],
    extras_require={
        # LVIS AP (levelset_d2.evaluation) and Cityscapes instance AP (Detectron2's evaluator).
        "eval": ["lvis", "cityscapesscripts"],
        # Brush (RLE) results of the Label Studio backend (delse.label_studio).
        "label-studio": ["label-studio-sdk"],
    },
)
