#!/usr/bin/env python
"""
Train and evaluate LevelSet R-CNN (and its Mask R-CNN baselines) and DELSE with Detectron2.

    python train_net.py --config-file configs/LevelSetRCNN/levelset_rcnn_R_50_FPN_1x_coco.yaml --num-gpus 8
    python train_net.py --config-file <cfg> --eval-only MODEL.WEIGHTS <model.pth>

``--num-gpus N`` on a machine without GPUs runs N CPU processes (gloo). The trainer, its data
loaders and evaluators are the shared layer's (:mod:`levelset_d2.engine`); importing the projects
registers their heads, architectures, config keys and builders.
"""
from detectron2.engine import default_argument_parser, launch

import delse  # noqa: F401  (registration)
import levelset_rcnn  # noqa: F401  (registration)
from levelset_d2.engine import Trainer, main, setup  # noqa: F401  (Trainer, setup: for scripts that import train_net)


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
