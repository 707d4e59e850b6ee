#!/usr/bin/env bash
# The CSM paper's CIFAR-10 protocol at scale, from nothing to a leaderboard (docs/cifar10.md):
#   1. csm fit-diffusion  class-conditional UNet on the CIFAR-10 train split (preset base)
#   2. csm generate       19,980 semantic-mixing groups (NUM_GROUPS) x 8 = 159,840 images (Heun, 20 steps)
#   3. csm annotate       CLIP ViT-B/32 prototypes + squash s = 4 (annotation s4)
#   4. csm benchmark      CIFAR ResNet-50, 200 epochs (train/cifar10_resnet50.yaml), the methods
#                         the paper compares against + csm, 5 seeds on one split (--data-seed 0),
#                         then every calibrator on clean and corrupted test
#
# usage: [VAR=value ...] bash eval/cifar10.sh [--dry-run]      (--help lists every variable)
#   Every size is a variable whose default is the paper's (NUM_GROUPS=19980, GROUP_SIZE=8,
#   EPOCHS=200, SEEDS=5, ...); WORK (.cache/cifar10) holds the generator and the synthetic data,
#   OUT (eval/results/cifar10) the benchmark. Every input is checked before the first write.
#   Every step skips work that is already complete (and says so), and an interrupted step resumes,
#   so the script is resumable: rerun the same command after a kill.
# The steps are eval/cifar10.py; it runs csm as `python -m csm` with this interpreter: $PYTHON,
# else the checkout's .venv, else python3.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" "$ROOT/eval/cifar10.py" "$@"
