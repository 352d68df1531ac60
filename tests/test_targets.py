import pytest
import torch

from util.targets import (
    PixelTarget,
    compute_targets,
    cosine_per_patch,
    masked_mean,
    mse_per_patch,
    patchify,
    unpatchify,
)


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
