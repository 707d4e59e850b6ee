"""Shared test setup: everything runs offline, on CPU, with few threads."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Keep datasets' cache out of the user's home (read by datasets at import time).
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="csm-test-hf-"))

import torch  # noqa: E402

torch.set_num_threads(1)  # 2 shared cores: 1 thread is several times faster under load
