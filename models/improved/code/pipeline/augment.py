"""Batch augmentation on the training device: one affine warp per batch instead of per-image PIL.

Rotation, flip, translation and scale are folded into one 2x3 matrix per image and applied with
a single ``grid_sample``; brightness and contrast jitter are two tensor ops. Random draws come
from a CPU generator so runs are reproducible on any device and resumable from a checkpoint.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import Config


def affine_matrices(angle_deg: torch.Tensor, scale: torch.Tensor, tx: torch.Tensor,
                    ty: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) matrices for ``affine_grid``: output coords -> input coords, in [-1, 1] units.

    ``tx``/``ty`` are shifts of the output image as a share of its side; ``flip`` is a bool per
    image. The shift is applied after rotation and scale (in output coordinates), so a
    ``translate`` of .15 moves the face by at most .15 of the side whatever the zoom or angle.
    """
    a = angle_deg * (math.pi / 180)
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    fx = torch.where(flip, -1.0, 1.0)
    a00, a01, a10, a11 = cos * fx, -sin, sin * fx, cos
    # in = A (out - 2t): the output shifted by t maps back through the same A.
    row0 = torch.stack([a00, a01, -2 * (a00 * tx + a01 * ty)], dim=1)
    row1 = torch.stack([a10, a11, -2 * (a10 * tx + a11 * ty)], dim=1)
    return torch.stack([row0, row1], dim=1)


def warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


N_DRAWS = 7  # uniforms per image: angle, scale, tx, ty, flip, brightness, contrast


def random_theta(u: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Affine matrices from ``u``, uniforms (N, >=5) in [0, 1)."""
    angle = (u[:, 0] * 2 - 1) * cfg.rotation
    scale = cfg.scale_min + u[:, 1] * (cfg.scale_max - cfg.scale_min)
    tx = (u[:, 2] * 2 - 1) * cfg.translate
    ty = (u[:, 3] * 2 - 1) * cfg.translate
    flip = (u[:, 4] < 0.5) & cfg.flip
    return affine_matrices(angle, scale, tx, ty, flip)


def augment_batch(x: torch.Tensor, cfg: Config, u: torch.Tensor) -> torch.Tensor:
    """x: (B, 1, 48, 48) floats in [0, 1] -> augmented, same shape and range.

    ``u``: (B, N_DRAWS) uniforms on x's device, drawn by the caller from the run's seeded
    generator (a whole epoch at once), so no host work or sync happens per batch."""
    n = x.shape[0]
    x = warp(x, random_theta(u, cfg))
    if cfg.brightness > 0 or cfg.contrast > 0:
        j = u[:, 5:7].to(x.dtype).view(n, 2, 1, 1, 1)
        b = 1 + (j[:, 0] * 2 - 1) * cfg.brightness
        c = 1 + (j[:, 1] * 2 - 1) * cfg.contrast
        x = x * b
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = ((x - mean) * c + mean).clamp_(0, 1)
    return x


def tta_thetas(cfg: Config) -> torch.Tensor:
    """The study's TTA views: original, horizontal flip, a small rotation, a small translation."""
    angle = torch.tensor([0.0, 0.0, cfg.tta_rotation, 0.0])
    shift = torch.tensor([0.0, 0.0, 0.0, cfg.tta_translate])
    flip = torch.tensor([False, True, False, False])
    return affine_matrices(angle, torch.ones(4), shift, shift, flip)


def normalize(x: torch.Tensor, how: str) -> torch.Tensor:
    return x * 2 - 1 if how == "symmetric" else x
