import math

from util.pos_embed import resize_pos_embed, sincos_2d

import torch


def test_sincos_layout_matches_mae_by_hand():
    # dim 8 on a 2x2 grid: each half (4 channels) is [sin(p*w0), sin(p*w1), cos(p*w0), cos(p*w1)]
    # with w0 = 1, w1 = 1/10000**0.5 = 0.01; the first half encodes the column (w), the second the row (h)
    emb = sincos_2d(8, 2, cls_token=True)
    assert emb.shape == (5, 8)
    assert torch.equal(emb[0], torch.zeros(8))  # cls row

    def half(p):
        return [math.sin(p), math.sin(p * 0.01), math.cos(p), math.cos(p * 0.01)]

    # token order is row-major: (h, w) = (0,0), (0,1), (1,0), (1,1)
    for token, (h, w) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)], start=1):
        expected = torch.tensor(half(w) + half(h), dtype=torch.float32)
        assert torch.allclose(emb[token], expected, atol=1e-7), (token, emb[token], expected)


def test_sincos_base_shape_and_range():
    emb = sincos_2d(768, 14, cls_token=True)
    assert emb.shape == (197, 768)
    assert emb.dtype == torch.float32
    assert emb[1:].abs().max() <= 1.0


def test_resize_is_identity_at_equal_size_and_resamples_to_384():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    assert resize_pos_embed(pos, (14, 14)) is pos
    big = resize_pos_embed(pos, (24, 24))
    assert big.shape == (1, 1 + 24 * 24, 32)
    assert torch.equal(big[:, :1], pos[:, :1])  # cls row kept
