import math

import pytest
import torch

from targets.base import compute_targets
from targets.hog import HOGTarget
from targets.losses import cosine_per_patch, masked_mean, mse_per_patch
from targets.pixel import PixelTarget, patchify, unpatchify


def test_patchify_layout_and_roundtrip():
    imgs = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patchify(imgs, 2)
    assert p.shape == (2, 4, 12)
    # patch 1 is the top-right 2x2 block; channels last within each pixel
    expected = torch.stack([imgs[0, :, 0, 2], imgs[0, :, 0, 3], imgs[0, :, 1, 2], imgs[0, :, 1, 3]]).flatten()
    assert torch.equal(p[0, 1], expected)
    assert torch.equal(unpatchify(p, 2, (2, 2)), imgs)


def test_pixel_loss_by_hand_with_and_without_norm_pix():
    torch.manual_seed(0)
    imgs = torch.randn(1, 3, 4, 4)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    pred = torch.randn(1, 4, 12)

    raw = PixelTarget(4, 2, norm_pix=False)(imgs)
    by_hand = []
    for i in (0, 2):  # masked patches only
        by_hand.append(((pred[0, i] - raw[0, i]) ** 2).mean())
    assert torch.allclose(masked_mean(mse_per_patch(pred, raw), mask), torch.stack(by_hand).mean())

    norm = PixelTarget(4, 2, norm_pix=True)(imgs)
    patch = raw[0, 2]
    mean, var = patch.mean(), patch.var(unbiased=True)
    assert torch.allclose(norm[0, 2], (patch - mean) / torch.sqrt(var + 1e-6), atol=1e-6)
    by_hand = torch.stack([((pred[0, i] - norm[0, i]) ** 2).mean() for i in (0, 2)]).mean()
    assert torch.allclose(masked_mean(mse_per_patch(pred, norm), mask), by_hand)


def test_cosine_loss_by_hand():
    pred = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]]])
    target = torch.tensor([[[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0]]])
    per_patch = cosine_per_patch(pred, target)
    assert torch.allclose(per_patch, torch.tensor([[2.0, 0.0, 4.0]]), atol=1e-6)  # 2 - 2cos: 90, 0, 180 degrees
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.allclose(masked_mean(per_patch, mask), torch.tensor(1.0))


def test_compute_targets_gives_ordinary_tensors_usable_in_backward():
    imgs = torch.randn(2, 3, 8, 8)
    out = compute_targets({"pixel": PixelTarget(8, 4)}, imgs)["pixel"]
    assert not out.is_inference() and not out.requires_grad
    pred = torch.zeros_like(out, requires_grad=True)
    cosine_per_patch(pred + 1, out).sum().backward()  # would fail on an inference tensor
    assert pred.grad is not None


def test_patchify_rejects_indivisible_size():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.zeros(1, 3, 10, 10), 4)


# --------------------------------------------------------------------------------------------
# HOG (MaskFeat)

def _hog_cells(out, cells_per_patch, channels=3, nbins=9):
    """[N, L, C*9*k*k] (MaskFeat's label layout) -> [N, L, k*k, C, 9]."""
    return out.view(out.shape[0], out.shape[1], channels, nbins, cells_per_patch).permute(0, 1, 4, 2, 3)


def test_hog_vertical_edge_votes_in_the_horizontal_gradient_bin():
    imgs = torch.zeros(1, 3, 32, 32)
    imgs[..., 12:] = 1.0  # vertical step edge between columns 11 and 12: inside patch 0 and patch 2
    out = HOGTarget(32, 16)(imgs)
    assert out.shape == (1, 4, 108)  # 2x2 patches of 16 px; (16/8)^2 cells * 3 channels * 9 bins
    h = _hog_cells(out, 4)
    for patch in (0, 2):  # left column of patches: its right cells (1, 3) hold the edge
        # all of it in MaskFeat's bin 4 (horizontal gradients), L2-normalized
        assert torch.allclose(h[0, patch, [1, 3], :, 4], torch.ones(2, 3))
        assert h[0, patch, :, :, [0, 1, 2, 3, 5, 6, 7, 8]].abs().max() == 0
        assert h[0, patch, [0, 2]].abs().max() == 0  # cells left of the edge see a flat image
    assert h[0, [1, 3]].abs().max() == 0  # right column of patches: flat


def test_hog_diagonal_edge_goes_to_the_40_degree_bin():
    ys, xs = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    imgs = (xs + ys >= 16).float().expand(1, 3, 16, 16)  # gradient along (1, 1): 45 degrees, MaskFeat's bin 2 (30-50]
    h = _hog_cells(HOGTarget(16, 16)(imgs), 4)
    # the top-left and bottom-right cells meet the edge mid-image (the other two also where the
    # edge meets the border, which the reflect padding bends)
    energy = h[0, 0, [0, 3]].sum(dim=(0, 1))
    assert energy[2] > 0 and energy.sum() == energy[2]


@pytest.mark.parametrize("value", [0.0, -1.7, 3.0])
def test_hog_of_a_flat_image_is_zero(value):
    assert HOGTarget(32, 16)(torch.full((2, 3, 32, 32), value)).abs().max() == 0


@pytest.mark.parametrize("img, patch, cell, dim", [(224, 16, 8, 108), (32, 4, 4, 27), (224, 14, 7, 108)])
def test_hog_shape_follows_the_patch_grid(img, patch, cell, dim):
    t = HOGTarget(img, patch)
    assert (t.cell, t.dim, t.grid, t.loss) == (cell, dim, (img // patch, img // patch), "mse")
    assert t(torch.randn(2, 3, img, img)).shape == (2, (img // patch) ** 2, dim)


def test_hog_matches_a_per_pixel_computation_and_ignores_per_channel_normalization():
    torch.manual_seed(0)
    imgs = torch.rand(1, 3, 8, 8)
    t = HOGTarget(8, 8, cell_size=4)
    out = _hog_cells(t(imgs), 4)
    # by hand: Sobel on the reflect-padded image, MaskFeat's bin floor(atan2(-gx, -gy) / 20 deg) mod 9,
    # Gaussian-weighted votes
    pad = torch.nn.functional.pad(imgs, (1, 1, 1, 1), mode="reflect")[0]
    win = [math.exp(-0.5 * ((i - 3.5) / 4) ** 2) for i in range(8)]
    hist = torch.zeros(2, 2, 3, 9, dtype=torch.float64)
    for c in range(3):
        for y in range(8):
            for x in range(8):
                p = pad[c, y:y + 3, x:x + 3].double()
                gx = (p[:, 2] - p[:, 0]) @ torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
                gy = (p[2, :] - p[0, :]) @ torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
                b = math.floor(math.atan2(-gx, -gy) / math.pi * 9) % 9
                hist[y // 4, x // 4, c, b] += math.hypot(gx, gy) * win[y] * win[x]
    hist = hist / hist.norm(dim=-1, keepdim=True)
    assert torch.allclose(out[0, 0], hist.reshape(4, 3, 9).float(), atol=1e-5)
    # ImageNet normalization is a per-channel affine map: per-channel, per-cell L2 norms cancel it
    assert torch.allclose(t(imgs * torch.tensor([4.4, 4.5, 4.4]).view(1, 3, 1, 1) - 2.0), t(imgs), atol=1e-5)


def test_hog_stays_float32_under_autocast():
    imgs = torch.randn(2, 3, 32, 32)
    t = HOGTarget(32, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = t(imgs)
    assert out.dtype == torch.float32 and torch.equal(out, t(imgs))
