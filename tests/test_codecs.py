import numpy as np
import pytest
import torch

from datasets.codecs import CoordinateCodec, HeatmapCodec
from datasets.joints import COCO, LSP, MPII


def test_heatmap_round_trip_within_half_a_heatmap_pixel():
    codec = HeatmapCodec(256, 64, 2.0)
    rng = np.random.default_rng(0)
    # every joint whose Gaussian centre int(x / 4 + 0.5) lies on the 64 x 64 map
    joints = rng.uniform(0, 4 * 63.5 - 1e-3, (500, 2)).astype(np.float32)
    target, weight = codec.encode(joints, np.ones(500))
    assert weight.min() == 1
    coords, scores = codec.decode(target[None])
    err = np.abs(coords[0] - joints) / 4.0  # in heatmap pixels
    assert err.max() <= 0.5 + 1e-6
    assert np.allclose(scores, 1.0)


def test_heatmap_target_follows_msra_convention():
    codec = HeatmapCodec(256, 64, 2.0)
    target, weight = codec.encode(np.array([[41.0, 22.5]]), np.array([1]))
    # centre int(x / 4 + 0.5): x 41 -> 10, y 22.5 -> 6
    assert np.unravel_index(target[0].argmax(), target[0].shape) == (6, 10)
    assert target[0, 6, 10] == 1.0
    # truncated at 3 sigma: nothing beyond radius 6
    assert target[0, 6, 17] == 0 and target[0, 6, 16] > 0
    assert np.isclose(target[0, 6, 12], np.exp(-4 / 8))


def test_heatmap_weights_unlabelled_and_outside():
    codec = HeatmapCodec(64, 16, 1.0)
    joints = np.array([[10, 10], [10, 10], [-30, 10], [90, 90], [-5, 8]], np.float32)
    target, weight = codec.encode(joints, np.array([1, 0, 1, 1, 1]))
    assert weight.tolist() == [1, 0, 0, 0, 1]  # the last is outside but its Gaussian reaches in
    assert target[1].max() == 0 and target[2].max() == 0
    assert target[4].max() > 0


def test_quarter_pixel_shift_towards_higher_neighbour():
    codec = HeatmapCodec(64, 16, 1.0)
    hm = np.zeros((1, 1, 16, 16), np.float32)
    hm[0, 0, 5, 7] = 1.0
    hm[0, 0, 5, 8] = 0.5   # right neighbour higher than left
    hm[0, 0, 4, 7] = 0.3   # upper neighbour higher than lower
    coords, _ = codec.decode(hm)
    assert np.allclose(coords[0, 0], [(7.25) * 4, (4.75) * 4])


def test_heatmap_flip_back_swaps_channels_and_shifts():
    codec = HeatmapCodec(64, 16, 1.0)
    perm = torch.as_tensor(MPII.flip_permutation())
    out = torch.zeros(1, 16, 16, 16)
    out[0, 0, 3, 2] = 1  # r_ankle at x=2 in the flipped image
    back = codec.flip_back(out, perm)
    # becomes l_ankle (5) at the mirrored column 13, shifted right by one pixel
    assert back[0, 5].argmax().item() == 3 * 16 + 14
    assert back[0, 0].max() == 0


@pytest.mark.parametrize('js', [MPII, LSP, COCO])
def test_flip_pairs_are_an_involution(js):
    perm = js.flip_permutation()
    assert np.array_equal(perm[perm], np.arange(js.num_joints))
    for a, b in js.flip_pairs:
        assert {js.side(a), js.side(b)} == {'L', 'R'}


def test_coordinate_codec_round_trip_and_flip():
    codec = CoordinateCodec(64)
    joints = np.array([[0, 0], [63, 10], [31.5, 40], [80, 5]], np.float32)
    target, weight = codec.encode(joints, np.array([1, 1, 1, 1]))
    assert weight.tolist() == [1, 1, 1, 0]
    back, _ = codec.decode(target[None])
    assert np.allclose(back[0, :3], joints[:3], atol=1e-4)
    # flipping the crop maps x to 63 - x; flip_back must undo it exactly
    perm = torch.arange(4)
    flipped = torch.as_tensor(((np.stack([63 - joints[:, 0], joints[:, 1]], 1)) / 64 - 0.5)[None])
    restored, _ = codec.decode(codec.flip_back(flipped, perm))
    assert np.allclose(restored[0], joints, atol=1e-4)
