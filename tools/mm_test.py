#!/usr/bin/env python
"""Evaluate a trained detector/segmentor checkpoint on the config's test set.

    python tools/mm_test.py CONFIG work_dirs/NAME/epoch_12.pth
    torchrun --nproc-per-node 8 tools/mm_test.py CONFIG CHECKPOINT --launcher pytorch

Official VMamba / Spatial-Mamba / EfficientVMamba detection or segmentation checkpoints convert
with ``vmamba_zoo.mm.convert_dense_checkpoint`` first.
"""
from mmengine.runner import Runner

from vmamba_zoo.mm.cli import build_parser, config_from_args


def main():
    args = build_parser('Test a detector or segmentor', test=True).parse_args()
    Runner.from_cfg(config_from_args(args)).test()


if __name__ == '__main__':
    main()
