"""Batch augmentation: shifts in output coordinates, reproducible draws."""

from __future__ import annotations

import pytest
import torch

from pipeline.augment import N_DRAWS, affine_matrices, augment_batch, warp
from pipeline.config import Config

# Pure logic: no MLflow store is made for these tests.
pytestmark = pytest.mark.no_store


def _centroid(img: torch.Tensor) -> tuple[float, float]:
    h, w = img.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    m = img.double().clamp_min(0)
    return float((m * xs).sum() / m.sum()), float((m * ys).sum() / m.sum())


@pytest.mark.parametrize("angle, scale", [(0.0, 1.0), (30.0, 1.15), (-15.0, 0.85)])
def test_translation_is_a_share_of_the_output_side_whatever_the_zoom_and_angle(angle, scale):
    x = torch.zeros(1, 1, 48, 48)
    x[..., 20:28, 20:28] = 1.0  # a blob centred on the image centre (23.5, 23.5)
    theta = affine_matrices(torch.tensor([angle]), torch.tensor([scale]), torch.tensor([0.15]),
                            torch.tensor([-0.1]), torch.tensor([False]))
    cx, cy = _centroid(warp(x, theta)[0, 0])
    assert cx - 23.5 == pytest.approx(0.15 * 48, abs=0.25)  # right by .15 of the side
    assert cy - 23.5 == pytest.approx(-0.1 * 48, abs=0.25)  # up by .1


def test_augmentation_is_a_function_of_its_draws():
    cfg = Config(augment=True, rotation=15, translate=0.15, scale_min=0.85, scale_max=1.15,
                 brightness=0.1, contrast=0.1)
    x = torch.rand(4, 1, 48, 48)
    u = torch.rand(4, N_DRAWS, generator=torch.Generator().manual_seed(0))
    a, b = augment_batch(x, cfg, u), augment_batch(x, cfg, u)
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert not torch.allclose(a, augment_batch(x, cfg, torch.rand(4, N_DRAWS)))
