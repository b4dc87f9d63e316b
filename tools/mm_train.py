#!/usr/bin/env python
"""Train an MMDetection / MMSegmentation config with a zoo backbone.

    python tools/mm_train.py configs/mmdet/groupmamba/mask-rcnn_groupmamba-tiny_fpn_1x_coco.py
    torchrun --nproc-per-node 8 tools/mm_train.py CONFIG --launcher pytorch [--amp] [--resume]
"""
from mmengine.runner import Runner

from vmamba_zoo.mm.cli import build_parser, config_from_args


def main():
    args = build_parser('Train a detector or segmentor').parse_args()
    Runner.from_cfg(config_from_args(args)).train()


if __name__ == '__main__':
    main()
