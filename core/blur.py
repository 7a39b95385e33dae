"""Gaussian smoothing of anomaly maps, shared by every detector.

PatchCore and the autoencoder baseline both blur their upsampled maps with sigma 4; this is
``scipy.ndimage.gaussian_filter`` (mode 'reflect', truncate 4) in torch, so it runs on the
model's device and inside the scoring threads without a round trip through numpy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The largest sigma a detector may blur with: its kernel reaches 4 sigma each way, so 1024 already spans the
# largest map a saved record may name (core.records.MAX_SIDE, 4096 px); a larger sigma only costs memory (a
# hostile 1e12 would ask for a 4e12-tap kernel).
MAX_BLUR_SIGMA = 1024.0


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """1-D Gaussian with radius int(truncate * sigma + 0.5), as scipy.ndimage.gaussian_filter."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).float()


def _symmetric_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """scipy's 'reflect' mode (d c b a | a b c d | d c b a), which torch's padding modes lack."""
    size = x.shape[dim]
    positions = torch.arange(-radius, size + radius, device=x.device) % (2 * size)
    index = torch.where(positions < size, positions, 2 * size - 1 - positions)
    return x.index_select(dim, index)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, H, W]`` maps matching scipy.ndimage.gaussian_filter(sigma)."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma).to(maps.device)
    radius = len(kernel) // 2
    x = maps.unsqueeze(1)
    x = F.conv2d(_symmetric_pad(x, radius, 3), kernel.view(1, 1, 1, -1))
    x = F.conv2d(_symmetric_pad(x, radius, 2), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)
