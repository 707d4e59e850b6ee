"""The one inference loop: logits of a classifier on uint8 images, batch by batch.

Training (validation each epoch), evaluation and annotation all call :func:`predict`.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["predict"]


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    bf16: bool = False,
) -> torch.Tensor:
    """Logits of uint8 images ``(N, C, H, W)`` in eval mode, batch by batch, on the CPU.

    Args:
        model: A classifier from :mod:`csm.training.models`.
        images: uint8 images.
        batch_size: Images per forward pass.
        device: Where to run the model (it must already live there).
        bf16: Use bf16 autocast (only honoured on CUDA).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(device, non_blocking=True).float().div_(255)
            with torch.autocast(
                "cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"
            ):
                out.append(model(x).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
