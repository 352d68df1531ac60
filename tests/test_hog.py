"""HOG target against MaskFeat's HOG operator (``HOGLayerC`` of SlowFast, the MaskFeat code): its
binning rule and its whole operator, written out here from its definition."""
import math

import pytest
import torch
import torch.nn.functional as F

from targets.hog import HOGTarget, orientation_bin, sobel


def maskfeat_bin(gx_m, gy_m, nbins=9):
    """MaskFeat's rule: its Sobel outputs (x kernel [[1, 0, -1], [2, 0, -2], [1, 0, -1]], y kernel its
    transpose, i.e. left minus right and top minus bottom), phase ``atan2(gx, gy) / pi * nbins``,
    ``floor`` and ``% nbins``."""
    return (torch.atan2(gx_m, gy_m) / math.pi * nbins).floor().long() % nbins


def maskfeat_hog_tokens(x, patch=16, pool=8, window=16, nbins=9):
    """MaskFeat's whole HOG (convolutions, the normalized Gaussian kernel, one-hot votes pooled over
    ``pool`` x ``pool`` cells, L2 per cell) and its label layout: [N, L, C * nbins * k * k]."""
    kx = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
    gx, gy = F.conv2d(xp, kx, groups=3), F.conv2d(xp, kx.transpose(2, 3), groups=3)
    n = torch.arange(window).float()
    g = torch.exp(-0.5 * ((n - n.mean()) / (window // 2)) ** 2)
    kern = torch.outer(g, g) / torch.outer(g, g).sum()
    b, c, h, w = x.shape
    mag = torch.stack([gx, gy], dim=-1).norm(dim=-1) * kern.repeat(h // window, w // window)
    votes = torch.zeros(b, c, nbins, h, w).scatter_add_(2, maskfeat_bin(gx, gy, nbins)[:, :, None], mag[:, :, None])
    hist = F.normalize(votes.unfold(3, pool, pool).unfold(4, pool, pool).sum(dim=(-1, -2)), dim=2)
    k = patch // pool
    t = hist.flatten(1, 2).permute(0, 2, 3, 1)  # [N, H/pool, W/pool, C * nbins]
    return t.unfold(1, k, k).unfold(2, k, k).flatten(1, 2).flatten(2)


def test_binning_is_maskfeats_rule_on_a_fine_grid_of_angles_and_the_exact_edges():
    theta = torch.linspace(-math.pi, math.pi, 200_001, dtype=torch.float64)
    gx, gy = torch.cos(theta).float(), torch.sin(theta).float()
    # the edges: the axes land exactly on one (phase 0 or +-9 in MaskFeat's rule; signed zeros too),
    # and around every edge (MaskFeat's phase at a multiple of 20 degrees: gx = -sin, gy = -cos of it)
    # the closest float vectors on both sides of it
    edges = torch.arange(-9, 10, dtype=torch.float64) * math.pi / 9
    ex, ey = -torch.sin(edges).float(), -torch.cos(edges).float()
    steps = torch.arange(-64, 65, dtype=torch.float32) * 2.0**-24  # a few float steps of a unit vector
    near_x = (ex[:, None] + steps).flatten()
    near_y = ey[:, None].expand(-1, len(steps)).flatten()
    axes = torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0], [-1.0, 0.0], [-0.0, 1.0], [0.0, -0.0], [-0.0, -1.0],
                         [3.0, 0.0], [-0.0, -2.5], [0.0, 0.0]])
    gx = torch.cat([gx, near_x, axes[:, 0]])
    gy = torch.cat([gy, near_y, axes[:, 1]])
    # our gradients are (x right, y down); MaskFeat's kernels give their negatives
    ours = orientation_bin(gx, gy)
    assert torch.equal(ours, maskfeat_bin(-gx, -gy))
    phase = torch.atan2(-gx, -gy) / math.pi * 9
    assert (phase == phase.round()).sum() >= 8  # the axes: exactly on an edge
    for k in range(-8, 9):  # every edge crossed within a few float steps
        assert ((phase < k) & (phase > k - 1e-5)).any() and ((phase >= k) & (phase < k + 1e-5)).any(), k
    # what the rule means: bin b holds theta = atan2(gy, gx) in (70 - 20 b, 90 - 20 b] degrees mod 180
    deg = torch.rad2deg(torch.atan2(gy.double(), gx.double()))
    far = (((deg - 10) / 20 - ((deg - 10) / 20).round()).abs() > 1e-4) & (gx.abs() + gy.abs() > 0)  # off the edges
    expected = torch.floor(torch.remainder(90 - deg[far], 180) / 20).long() % 9
    assert torch.equal(ours[far], expected)
    # unsigned: the opposite gradient falls in the same bin (up to float rounding right at an edge)
    assert torch.equal(orientation_bin(-gx[far], -gy[far]), ours[far])
    assert torch.equal(orientation_bin(torch.zeros(2), torch.tensor([1.0, -1.0])), torch.tensor([0, 0]))


@pytest.mark.parametrize("size, patch", [(32, 16), (16, 4)])
def test_a_horizontal_edge_gives_one_histogram_whichever_side_is_brighter(size, patch):
    imgs = torch.zeros(1, 3, size, size)
    imgs[..., size // 2 - 3:, :] = 1.0  # dark over light; every gradient is vertical (gx == 0 exactly)
    t = HOGTarget(size, patch)
    dark_over_light, light_over_dark = t(imgs), t(1.0 - imgs)
    assert torch.equal(dark_over_light, light_over_dark)
    k = (patch // t.cell) ** 2
    bins = dark_over_light.view(1, -1, 3, 9, k)
    assert bins[:, :, :, 0].abs().sum() > 0 and bins[:, :, :, 1:].abs().max() == 0  # all in bin 0 (vertical gradients)


def test_the_border_columns_bin_both_signs_of_their_vertical_gradients_together():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    gx, gy = sobel(x)
    for col in (0, -1):  # reflect padding: the left and right columns have gx == 0 exactly
        assert gx[..., col].abs().max() == 0
        assert (gy[..., col] > 0).any() and (gy[..., col] < 0).any()
        assert orientation_bin(gx[..., col], gy[..., col]).max() == 0
    # whole target: a picture made of its border columns only (constant along rows) and its negative
    rows = torch.rand(1, 3, 16, 1).expand(1, 3, 16, 16).contiguous()
    t = HOGTarget(16, 4)
    assert torch.equal(t(rows), t(-rows))


def test_whole_hog_equals_maskfeats_operator_on_a_smooth_image():
    """Ours against MaskFeat's operator on a natural-looking image (smooth, bicubic-upsampled noise,
    ImageNet-like range): the same tokens up to float rounding (the gradients here are not exactly
    zero anywhere, so the convolution's rounding cannot move a vote across a bin edge)."""
    torch.manual_seed(0)
    x = F.interpolate(torch.randn(2, 3, 8, 8), size=(64, 64), mode="bicubic", align_corners=False) * 1.5
    ours, ref = HOGTarget(64, 16)(x), maskfeat_hog_tokens(x)
    assert ours.shape == ref.shape == (2, 16, 108)
    assert (ours - ref).abs().max() < 1e-5
