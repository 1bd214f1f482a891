"""Torch-side helpers shared by the GPU backends (torch and TensorRT)."""
from __future__ import annotations

import torch

from batchcls.card import ModelCard
from batchcls.presets import normalization


class DeviceNormalize:
    """uint8 NCHW on the device -> float32 normalized: ``presets.normalize`` done where the pixels are."""

    def __init__(self, card: ModelCard, device: torch.device) -> None:
        shift, scale = normalization(card.mean, card.std)
        self.shift = torch.from_numpy(shift).to(device).reshape(1, 3, 1, 1)
        self.scale = torch.from_numpy(scale).to(device).reshape(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.shift) / self.scale
