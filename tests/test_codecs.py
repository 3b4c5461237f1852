import numpy as np
import pytest
import torch

from datasets.codecs import CODECS, CoordinateCodec, HeatmapCodec, codec_from_settings
from datasets.joints import COCO, LSP, MPII


def encode(codec, joints, visible):
    """One person's (K, 2) keypoints and (K,) visibility through the codec's encode."""
    return codec.encode(dict(keypoints=np.asarray(joints, np.float32)[None],
                             visible=np.asarray(visible, np.float32)[None]))


def test_heatmap_round_trip_within_half_a_heatmap_pixel():
    codec = HeatmapCodec(256, 64, 2.0)
    rng = np.random.default_rng(0)
    # every joint whose Gaussian centre int(x / 4 + 0.5) lies on the 64 x 64 map
    joints = rng.uniform(0, 4 * 63.5 - 1e-3, (500, 2)).astype(np.float32)
    t = encode(codec, joints, np.ones(500))
    target, weight = t['heatmap'], t['heatmap_weight']
    assert weight.min() == 1
    coords, scores = codec.decode_heatmaps(target[None])
    err = np.abs(coords[0] - joints) / 4.0  # in heatmap pixels
    assert err.max() <= 0.5 + 1e-6
    assert np.allclose(scores, 1.0)


def test_heatmap_target_follows_msra_convention():
    codec = HeatmapCodec(256, 64, 2.0)
    target = encode(codec, np.array([[41.0, 22.5]]), np.array([1]))['heatmap']
    # centre int(x / 4 + 0.5): x 41 -> 10, y 22.5 -> 6
    assert np.unravel_index(target[0].argmax(), target[0].shape) == (6, 10)
    assert target[0, 6, 10] == 1.0
    # truncated at 3 sigma: nothing beyond radius 6
    assert target[0, 6, 17] == 0 and target[0, 6, 16] > 0
    assert np.isclose(target[0, 6, 12], np.exp(-4 / 8))


def test_heatmap_weights_unlabelled_and_outside():
    codec = HeatmapCodec(64, 16, 1.0)
    joints = np.array([[10, 10], [10, 10], [-30, 10], [90, 90], [-5, 8]], np.float32)
    t = encode(codec, joints, np.array([1, 0, 1, 1, 1]))
    target, weight = t['heatmap'], t['heatmap_weight']
    assert weight.tolist() == [1, 0, 0, 0, 1]  # the last is outside but its Gaussian reaches in
    assert target[1].max() == 0 and target[2].max() == 0
    assert target[4].max() > 0


def test_quarter_pixel_shift_towards_higher_neighbour():
    codec = HeatmapCodec(64, 16, 1.0)
    hm = np.zeros((1, 1, 16, 16), np.float32)
    hm[0, 0, 5, 7] = 1.0
    hm[0, 0, 5, 8] = 0.5   # right neighbour higher than left
    hm[0, 0, 4, 7] = 0.3   # upper neighbour higher than lower
    coords, _ = codec.decode_heatmaps(hm)
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
    t = encode(codec, joints, np.array([1, 1, 1, 1]))
    target, weight = t['coords'], t['coords_weight']
    assert weight.tolist() == [1, 1, 1, 0]
    back, _ = codec.decode_crop([target[None]])
    assert back.shape == (1, 1, 4, 2)
    assert np.allclose(back[0, 0, :3], joints[:3], atol=1e-4)
    # flipping the crop maps x to 63 - x; flip_back must undo it exactly
    perm = torch.arange(4)
    flipped = torch.as_tensor(((np.stack([63 - joints[:, 0], joints[:, 1]], 1)) / 64 - 0.5)[None])
    restored, _ = codec.decode_crop([codec.flip_back(flipped, perm)])
    assert np.allclose(restored[0, 0], joints, atol=1e-4)


def test_codecs_are_registered_by_target_and_rebuild_from_their_settings():
    assert CODECS['heatmap'] is HeatmapCodec and CODECS['coords'] is CoordinateCodec
    codec = HeatmapCodec((192, 256), (48, 64), 1.5)
    again = codec_from_settings(codec.settings())
    assert type(again) is HeatmapCodec and again.settings() == codec.settings()
    assert (again.input_size, again.output_size, again.sigma) == ((192, 256), (48, 64), 1.5)
    assert codec_from_settings(CoordinateCodec(64).settings()).input_size == (64, 64)


def test_heatmap_of_several_people_takes_the_maximum():
    codec = HeatmapCodec(64, 16, 1.0)
    a = np.array([[[10.0, 10.0], [40.0, 40.0]]])                    # person 1: joints 0 and 1
    b = np.array([[[14.0, 10.0], [0.0, 0.0]]])                      # person 2: joint 0 only
    both = codec.encode(dict(keypoints=np.concatenate([a, b]), visible=np.array([[1, 1], [1, 0]])))
    one = codec.encode(dict(keypoints=a, visible=np.ones((1, 2))))
    two = codec.encode(dict(keypoints=b, visible=np.array([[1, 0]])))
    assert np.array_equal(both['heatmap'], np.maximum(one['heatmap'], two['heatmap']))
    assert both['heatmap_weight'].tolist() == [1, 1] and two['heatmap_weight'].tolist() == [1, 0]
    none = codec.encode(dict(keypoints=np.zeros((0, 2, 2)), visible=np.zeros((0, 2))))
    assert none['heatmap'].max() == 0 and none['heatmap_weight'].tolist() == [0, 0]


def test_non_square_round_trip_in_original_pixels():
    """A 256x192 crop: the codec's 64x48 maps decode back onto the encoded points, and decode()
    maps them to the original image through the sample's affine."""
    from datasets.pipeline import affine_matrix, transform_points
    codec = HeatmapCodec((192, 256), (48, 64), 2.0)
    rng = np.random.default_rng(3)
    original = rng.uniform(100, 300, (17, 2))
    m = affine_matrix((200.0, 200.0), 240.0, (192, 256), rotation=20.0)
    crop = transform_points(original, m)
    t = encode(codec, crop, np.ones(17))
    assert t['heatmap'].shape == (17, 64, 48)
    batch = dict(heatmap=torch.from_numpy(t['heatmap'][None]),
                 meta=dict(affine=torch.from_numpy(m[None].astype(np.float32)), index=torch.tensor([7])))
    people = codec.decode([batch['heatmap']], batch)
    assert len(people) == 1 and people[0]['index'] == 7 and people[0]['keypoints'].shape == (1, 17, 2)
    # quarter-pixel decoding on a 4-pixel grid, scaled by the crop's zoom (240 / 192)
    err = np.abs(people[0]['keypoints'][0] - original).max()
    assert err <= 0.5 * 4 * 240 / 192 * 2 ** 0.5


def gaussian_map(w, h, x, y, sigma):
    """An unnormalised Gaussian of peak 1 centred at the sub-pixel position (x, y) of a (h, w) map."""
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    return np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2)).astype(np.float32)


def test_dark_recovers_a_sub_pixel_gaussian_the_quarter_shift_cannot():
    rng = np.random.default_rng(0)
    true = rng.uniform(8, 40, (200, 2))
    maps = np.stack([gaussian_map(48, 64, x, y, 2.0) for x, y in true])[None]      # (1, 200, 64, 48)
    errors = {}
    for mode in ('quarter', 'dark'):
        codec = HeatmapCodec((48, 64), (48, 64), 2.0, decode=mode)                  # stride 1: heatmap pixels
        coords, _ = codec.decode_heatmaps(maps)
        errors[mode] = np.abs(coords[0] - true)
    assert errors['dark'].max() < 0.05
    # the quarter-pixel decoder is off by up to a quarter pixel and more on a uniform spread
    assert errors['quarter'].max() > 0.24 and errors['quarter'].mean() > 0.1
    assert HeatmapCodec(64, 16, 2.0).settings()['decode'] == 'quarter'


def test_quarter_shift_follows_hrnet_only_two_pixels_inside():
    codec = HeatmapCodec(64, 16, 1.0)
    hm = np.zeros((1, 3, 16, 16), np.float32)
    hm[0, 0, 5, 1], hm[0, 0, 5, 2] = 1.0, 0.5      # x = 1: on HRNet's border, no shift
    hm[0, 1, 1, 7], hm[0, 1, 1, 8] = 1.0, 0.5      # y = 1: no shift along x either
    hm[0, 2, 5, 2], hm[0, 2, 5, 3] = 1.0, 0.5      # x = 2: shifted
    coords, _ = codec.decode_heatmaps(hm)
    assert coords[0].tolist() == [[4.0, 20.0], [28.0, 4.0], [9.0, 20.0]]
    assert HeatmapCodec(64, 16, 1.0, decode='dark').decode_heatmaps(hm)[0].shape == (1, 3, 2)


def flip_test_error(codec, width, rng, n=4000):
    """Encode random sub-pixel x positions, and their mirror positions as the flipped image's map
    (what an ideal model outputs), merge them as the flip test does, decode: signed errors in
    crop pixels."""
    errors = []
    perm = torch.arange(1)
    for x in rng.uniform(20, width - 21, n):
        straight = encode(codec, [[x, 40.0]], [1])['heatmap']
        mirrored = encode(codec, [[width - 1 - x, 40.0]], [1])['heatmap']
        merged = codec.flip_merge([torch.from_numpy(straight[None])], [torch.from_numpy(mirrored[None])], perm)
        errors.append(codec.decode_heatmaps(merged[-1])[0][0, 0, 0] - x)
    return np.array(errors)


@pytest.mark.parametrize('decode', ['quarter', 'dark'])
def test_udp_flip_round_trip_has_no_systematic_offset(decode):
    rng = np.random.default_rng(1)
    udp = flip_test_error(HeatmapCodec((192, 256), (48, 64), 2.0, decode=decode, udp=True), 192, rng)
    noise = 3 * udp.std() / np.sqrt(len(udp))     # the quarter decoder's errors spread over +/- 1 px
    assert abs(udp.mean()) < max(0.01, noise)
    if decode == 'dark':
        assert abs(udp.mean()) < 0.01 and np.abs(udp).max() < 0.01
    # the standard codec on the same test: the one-pixel shift of the mirrored map over-corrects,
    # by half a crop pixel (measured 0.49 with DARK, 0.23 with the quarter decoder)
    standard = flip_test_error(HeatmapCodec((192, 256), (48, 64), 2.0, decode=decode), 192, np.random.default_rng(1))
    assert standard.mean() > 0.15 and standard.mean() > 10 * standard.std() / np.sqrt(len(standard))


def test_udp_encodes_at_the_exact_sub_pixel_position():
    codec = HeatmapCodec((192, 256), (48, 64), 2.0, udp=True)
    s = (192 - 1) / (48 - 1)
    assert codec.stride[0] == pytest.approx(s) and codec.settings()['udp'] is True
    heatmap = encode(codec, [[10.3 * s, 20.7 * (255 / 63)]], [1])['heatmap'][0]
    expected = gaussian_map(48, 64, 10.3, 20.7, 2.0)
    inside = heatmap > 0                      # the 3-sigma window
    assert np.allclose(heatmap[inside], expected[inside], atol=1e-6)
    # the mirrored map of the mirrored position is the map itself: no shift needed
    mirrored = encode(codec, [[191 - 10.3 * s, 20.7 * (255 / 63)]], [1])['heatmap']
    back = codec.flip_back(torch.from_numpy(mirrored[None]), torch.arange(1))[0, 0].numpy()
    assert np.allclose(back, heatmap, atol=1e-6)
