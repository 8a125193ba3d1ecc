#!/usr/bin/env python
"""Train a semi-supervised segmentation method: ``python train.py --help`` lists the options.

With no arguments it trains FixMatch on the built-in synthetic data set (1/16 of the labels) and
prints the per-class IoU and mIoU of the validation set.
"""
import sys

from semiseg_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
