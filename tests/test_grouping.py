"""Associative embedding (datasets/grouping.py) on constructed inputs: grouping, refine, the
losses, the multi-scale sizes, the mapping back to the image and the aggregation of scales and
the flip."""
import numpy as np
import pytest
import torch

from datasets import grouping as g
from datasets.joints import COCO

torch.set_num_threads(1)

K = 17
BACKGROUND_TAG = 50.0     # tag of the pixels away from every joint: far from every person


def blob(heatmap, tagmap, x, y, tag, amplitude=0.9, sigma=1.5, radius=4):
    """Draw a Gaussian of ``amplitude`` centred at (x, y) (sub-pixel) into heatmap (H, W), keeping
    the maximum, and write ``tag`` into tagmap (H, W) within ``radius`` pixels."""
    h, w = heatmap.shape
    yy, xx = np.mgrid[0:h, 0:w]
    d2 = (xx - x) ** 2 + (yy - y) ** 2
    gauss = np.where(d2 <= (3 * sigma) ** 2, amplitude * np.exp(-d2 / (2 * sigma ** 2)), 0)
    np.maximum(heatmap, gauss, out=heatmap)
    tagmap[d2 <= radius ** 2] = tag


def scene(people, size=(64, 48)):
    """people: list of (joints (K, 2) sub-pixel centres or NaN for none, tag, amplitudes (K,)).
    -> heatmaps (K, H, W) float32, tags (K, H, W, 1) float32."""
    w, h = size
    heatmaps = np.zeros((K, h, w), np.float32)
    tags = np.full((K, h, w), BACKGROUND_TAG, np.float32)
    for joints, tag, amplitude in people:
        for k, (x, y) in enumerate(joints):
            if not np.isnan(x):
                blob(heatmaps[k], tags[k], x, y, tag, amplitude[k])
    return heatmaps, tags[..., None]


def layout(rng, n, size=(64, 48)):
    """n people whose joints of each type lie at least 12 pixels apart: (n, K, 2) sub-pixel."""
    w, h = size
    joints = np.zeros((n, K, 2))
    for k in range(K):
        while True:
            pts = rng.uniform(4, (w - 5, h - 5), (n, 2))
            gaps = np.linalg.norm(pts[:, None] - pts[None], axis=2) + 1e3 * np.eye(n)
            if gaps.min() >= 12:
                break
        joints[:, k] = pts
    return joints


def by_tag(people, tags, skip=()):
    """Output people (N, K, 4) -> for each input tag, the one output person carrying it (the
    joints in ``skip``, filled by refine, carry no tag)."""
    found = {}
    for p in people:
        present = np.delete(p, list(skip), axis=0)
        present = present[present[:, 2] > 0, 3]
        assert len(np.unique(present)) == 1, 'a person mixes joints of different people'
        found[float(present[0])] = p
    assert sorted(found) == sorted(float(t) for t in tags)
    return [found[float(t)] for t in tags]


@pytest.mark.parametrize('n', [2, 3])
def test_people_with_distinct_tags_are_recovered(n):
    rng = np.random.default_rng(n)
    joints = layout(rng, n)
    person_tags = [0.0, 3.0, -2.5][:n]
    heatmaps, tags = scene([(j, t, np.full(K, 0.9)) for j, t in zip(joints, person_tags)])
    people, scores = g.parse(heatmaps, tags)
    assert people.shape == (n, K, 4) and scores.shape == (n,)
    for found, truth in zip(by_tag(people, person_tags), joints):
        assert (found[:, 2] > 0.1).all()
        # the authors' convention: pixel c is reported at c + 0.5 +- 0.25, the quarter towards
        # the higher neighbour, so a centre at x lands within a quarter pixel of x + 0.5
        assert np.abs(found[:, :2] - (truth + 0.5)).max() <= 0.25 + 1e-6
        assert np.allclose(found[:, 2], heatmaps[np.arange(K), np.floor(found[:, 1]).astype(int),
                                                  np.floor(found[:, 0]).astype(int)])
    # a person's score: the mean of its joints' scores
    assert np.allclose(np.sort(scores), np.sort(people[:, :, 2].mean(axis=1)))


def test_without_adjust_peaks_stay_on_pixels():
    rng = np.random.default_rng(7)
    joints = layout(rng, 2)
    heatmaps, tags = scene([(j, t, np.full(K, 0.9)) for j, t in zip(joints, (0.0, 4.0))])
    people, _ = g.parse(heatmaps, tags, adjust=False, refine=False)
    for found, truth in zip(by_tag(people, (0.0, 4.0)), joints):
        assert np.array_equal(found[:, :2], np.round(truth))


def test_people_with_equal_tags_merge_into_one():
    rng = np.random.default_rng(3)
    joints = layout(rng, 2)
    heatmaps, tags = scene([(j, 1.5, np.full(K, 0.9)) for j in joints])
    people, scores = g.parse(heatmaps, tags)
    assert people.shape == (1, K, 4) and scores.shape == (1,)
    assert (people[0, :, 3] == 1.5).all()


def test_refine_fills_a_missing_joint_from_the_person_tag():
    rng = np.random.default_rng(5)
    joints = layout(rng, 2)
    weak = np.full(K, 0.9)
    weak[9] = 0.08                       # below the detection threshold: no peak for joint 9
    heatmaps, tags = scene([(joints[0], 0.0, np.full(K, 0.9)), (joints[1], 5.0, weak)])

    unrefined, _ = g.parse(heatmaps, tags, refine=False)
    b = by_tag(unrefined, (0.0, 5.0))[1]
    assert b[9, 2] == 0 and (np.delete(b[:, 2], 9) > 0.1).all()

    people, scores = g.parse(heatmaps, tags)
    a, b = by_tag(people, (0.0, 5.0), skip=[9])
    # joint 9 from the heatmap near tag 5: the weak peak, not the other person's strong one
    assert np.abs(b[9, :2] - (joints[1, 9] + 0.5)).max() <= 0.25 + 1e-6
    assert 0.07 < b[9, 2] <= 0.08
    assert b[9, 3] == 0                  # refined joints carry no tag
    assert np.abs(a[:, :2] - (joints[0] + 0.5)).max() <= 0.25 + 1e-6
    # scores are taken before refine, as the authors do: joint 9 of b counts as 0
    order = [np.flatnonzero(people[:, 0, 3] == t)[0] for t in (0.0, 5.0)]
    assert np.isclose(scores[order[1]], np.delete(b[:, 2], 9).sum() / K)


def test_refine_person_alone():
    heatmaps = np.zeros((2, 9, 9), np.float32)
    tags = np.full((2, 9, 9, 1), 9.0, np.float32)
    heatmaps[0, 4, 4], tags[0, 4, 4] = 0.9, 1.0                   # the detected joint
    heatmaps[1, 2, 6], heatmaps[1, 2, 7], tags[1, 2, 6] = 0.5, 0.3, 1.2  # joint 1 near tag 1
    heatmaps[1, 7, 1], tags[1, 7, 1] = 0.95, 4.0                  # stronger, but another tag
    person = np.zeros((2, 4), np.float32)
    person[0] = (4.25, 4.25, 0.9, 1.0)
    out = g.refine_person(person, heatmaps, tags)
    assert np.allclose(out[1], (6 + 0.5 + 0.25, 2 + 0.5 - 0.25, 0.5, 0.0))
    assert np.array_equal(out[0], person[0])


def test_top_k_and_nms():
    heatmaps = np.zeros((1, 12, 12), np.float32)
    heatmaps[0, 2, 2], heatmaps[0, 2, 4] = 0.9, 0.5             # within 5x5: only 0.9 survives
    heatmaps[0, 9, 9] = 0.7
    tags = np.arange(144, dtype=np.float32).reshape(1, 12, 12, 1)
    vals, locs, peak_tags = g.top_k(heatmaps, tags, k=3, kernel=5)
    assert np.allclose(vals[0], (0.9, 0.7, 0.0))
    assert locs[0, :2].tolist() == [[2, 2], [9, 9]]
    assert peak_tags[0, :2, 0].tolist() == [2 * 12 + 2, 9 * 12 + 9]
    vals3, _, _ = g.top_k(heatmaps, tags, k=3, kernel=3)
    assert np.allclose(vals3[0], (0.9, 0.7, 0.5))


def test_match_by_tag_threshold_and_order():
    # one joint type at a time: joint 0 starts two people; joint 1 has a peak near each and one
    # too far from both, which starts a third person
    vals = np.array([[0.9, 0.8, 0.0], [0.7, 0.6, 0.5]], np.float32)
    locs = np.array([[[1, 1], [5, 5], [0, 0]], [[2, 2], [6, 6], [9, 9]]])
    peak_tags = np.array([[[0.0], [3.0], [0.0]], [[3.2], [0.1], [7.0]]], np.float32)
    people = g.match_by_tag(vals, locs, peak_tags, joint_order=(0, 1))
    assert people.shape == (3, 2, 4)
    assert np.allclose(people[0], [[1, 1, 0.9, 0.0], [6, 6, 0.6, 0.1]])
    assert np.allclose(people[1], [[5, 5, 0.8, 3.0], [2, 2, 0.7, 3.2]])
    assert people[2, 0].tolist() == [0, 0, 0, 0] and people[2, 1, :2].tolist() == [9, 9]
    # the joint order decides who starts the people
    people = g.match_by_tag(vals, locs, peak_tags, joint_order=(1, 0))
    assert people.shape == (3, 2, 4) and people[0, 1, 3] == pytest.approx(3.2)
    assert g.match_by_tag(np.zeros((2, 3), np.float32), locs, peak_tags).shape == (0, 2, 4)


def test_parse_without_people():
    people, scores = g.parse(np.zeros((K, 16, 16), np.float32), np.zeros((K, 16, 16), np.float32))
    assert people.shape == (0, K, 4) and scores.shape == (0,)


# ---------------------------------------------------------------------------------- losses

def test_ae_loss_by_hand():
    tags = torch.tensor([[1.0, 7.0, -1.0, 7.0, 7.0, 3.0, 7.0, 7.0]], dtype=torch.float64)  # K=2, 2x2
    joints = torch.zeros(1, 3, 2, 2, dtype=torch.long)
    joints[0, 0] = torch.tensor([[0, 1], [5, 1]])      # tags 1 and 3: mean 2, pull 1
    joints[0, 1, 0] = torch.tensor([2, 1])             # tag -1 alone: pull 0
    joints[0, 2, 0] = torch.tensor([1, 0])             # padding: flag 0
    push, pull = g.ae_loss(tags.view(1, 2, 2, 2), joints)
    assert push.shape == (1,) and pull.shape == (1,)
    assert pull.item() == pytest.approx(0.5)
    # two people, means 2 and -1: (2 + 2 exp(-9) - 2) / (1 * 2) * 0.5
    assert push.item() == pytest.approx(0.5 * np.exp(-9))


def test_ae_loss_three_people_and_empty_images():
    tags = torch.tensor([[0.0, 0.5, 2.0, 0.0], [0.0] * 4, [4.0, 0.0, 0.0, 0.0]])
    joints = torch.zeros(3, 4, 1, 2, dtype=torch.long)
    for m in range(3):
        joints[0, m, 0] = torch.tensor([m, 1])
    joints[2, 0, 0] = torch.tensor([0, 1])              # a single person: no push
    push, pull = g.ae_loss(tags, joints)
    pairs = np.exp(-0.25) + np.exp(-4) + np.exp(-2.25)
    assert push[0].item() == pytest.approx(2 * pairs / 6 * 0.5)
    assert pull.tolist() == [0, 0, 0] and push[1:].tolist() == [0, 0]


def test_ae_loss_max_push_by_hand_and_no_flat_start():
    tags = torch.tensor([[0.0, 0.5, 2.0, 0.0]], dtype=torch.float64)
    joints = torch.zeros(1, 3, 1, 2, dtype=torch.long)
    for m in range(3):
        joints[0, m, 0] = torch.tensor([m, 1])
    push, pull = g.ae_loss(tags, joints, 'max')
    # means 0, 0.5, 2: only the pair 0 / 0.5 is closer than 1, max(0, 1 - 0.5) twice over 6 pairs
    assert push.item() == pytest.approx(2 * 0.5 / 6 * 0.5) and pull.item() == 0
    # two people with nearly equal tags: 'exp' gives them almost no push apart, 'max' a full one
    near = torch.tensor([[0.0, 1e-4, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    grads = {}
    for kind in ('exp', 'max'):
        near.grad = None
        g.ae_loss(near, joints[:, :2], kind)[0].sum().backward()
        grads[kind] = near.grad[0, :2].abs().max().item()
    assert grads['max'] == pytest.approx(0.5) and grads['exp'] < 1e-4
    with pytest.raises(ValueError, match='push_type'):
        g.ae_loss(tags, joints, 'hinge')


def test_ae_loss_ignores_padded_people_and_has_gradients():
    rng = np.random.default_rng(0)
    tags = torch.tensor(rng.normal(size=(2, 3 * 4 * 4)), dtype=torch.float64, requires_grad=True)
    joints = np.zeros((2, 5, 3, 2), np.int64)
    joints[0, 0] = [[3, 1], [16 + 5, 1], [0, 0]]
    joints[0, 2] = [[7, 1], [32 + 1, 1], [32 + 9, 1]]
    joints[1, 1] = [[2, 1], [20, 1], [40, 1]]
    padded = joints.copy()
    padded[0, 4] = [[11, 0], [12, 0], [13, 0]]          # flag 0: not counted, whatever the index
    a = g.ae_loss(tags, joints)
    b = g.ae_loss(tags, padded)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    (a[0].sum() + a[1].sum()).backward()
    used = np.zeros(tags.shape, bool)
    for img, m, k in zip(*np.nonzero(joints[..., 1])):
        used[img, joints[img, m, k, 0]] = True
    grad = tags.grad.numpy()
    assert np.all(grad[~used] == 0) and np.all(grad[used] != 0)
    leaf = tags.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: torch.cat(g.ae_loss(t, joints)), (leaf,))


def test_heatmap_loss():
    pred = torch.ones(2, 3, 4, 4)
    gt = torch.zeros(2, 3, 4, 4)
    mask = torch.zeros(2, 4, 4)
    mask[0, :2] = 1
    assert g.heatmap_loss(pred, gt, mask).tolist() == [0.5, 0.0]


def test_tag_targets():
    keypoints = np.array([[[1.5, 2.9], [-0.5, 1.0], [3.0, 3.0], [4.2, 0.0]],
                          [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
    visible = np.array([[1, 1, 0, 1], [0, 0, 0, 0]])
    t = g.tag_targets(keypoints, visible, (4, 5), max_people=3)   # W 4, H 5
    assert t.shape == (3, 4, 2) and t.dtype == np.int64
    # joint 0 at (1, 2); joint 1 truncates to x 0 (as the authors' int()); joint 2 invisible;
    # joint 3 off the map (x 4 >= W); packed from slot 0
    assert t[0].tolist() == [[0 * 20 + 2 * 4 + 1, 1], [1 * 20 + 1 * 4 + 0, 1], [0, 0], [0, 0]]
    assert not t[1:].any()


# ---------------------------------------------------------------------------------- test time

def test_multi_scale_size():
    size, center, scale = g.multi_scale_size((640, 480), 512, 1.0, 1.0)
    assert size == (704, 512) and center.tolist() == [320, 240]
    assert np.allclose(scale, (704 / 512 * 480 / 200, 480 / 200))
    size, _, _ = g.multi_scale_size((300, 500), 512, 1.0, 1.0)
    assert size == (512, 896)
    # scales relative to the smallest one, whose sizes are rounded up to multiples of 64
    assert g.multi_scale_size((640, 480), 512, 0.5, 0.5)[0] == (384, 256)
    assert g.multi_scale_size((640, 480), 512, 1.0, 0.5)[0] == (768, 512)
    assert g.multi_scale_size((640, 480), 512, 2.0, 0.5)[0] == (1536, 1024)


def test_affine_covers_the_image_and_points_round_trip():
    w, h = 640, 480
    size, center, scale = g.multi_scale_size((w, h), 512, 1.0, 1.0)
    m = g.scale_affine(center, scale, size)
    corners = np.array([[0, 0], [w, h]], np.float64)
    mapped = corners @ m[:, :2].T + m[:, 2]
    assert np.allclose(mapped[:, 1], (0, size[1]))           # the shorter side spans the input
    assert mapped[0, 0] >= 0 and mapped[1, 0] <= size[0]
    rng = np.random.default_rng(0)
    original = rng.uniform(0, (w, h), (2, K, 2))
    people = np.concatenate((original @ m[:, :2].T + m[:, 2], rng.random((2, K, 2))), axis=2)
    back = g.final_people(people, center, scale, size)
    assert np.allclose(back[..., :2], original, atol=1e-3)
    assert np.array_equal(back[..., 2:], people[..., 2:].astype(np.float32))


def test_parse_and_map_back_to_the_image():
    rng = np.random.default_rng(11)
    w, h = 100, 75
    size, center, scale = g.multi_scale_size((w, h), 64, 1.0, 1.0)   # (128, 64): the input size
    m = g.scale_affine(center, scale, size)
    zoom = m[0, 0]
    truth = layout(rng, 2, size)
    heatmaps, tags = scene([(j, t, np.full(K, 0.9)) for j, t in zip(truth, (0.0, 2.0))], size)
    people, _ = g.parse(heatmaps, tags)
    final = g.final_people(people, center, scale, size)
    original = (truth - m[:, 2]) / zoom
    for found, o in zip(by_tag(final, (0.0, 2.0)), original):
        # the authors' half-pixel offset and the quarter-pixel adjustment, in original pixels
        assert np.abs(found[:, :2] - (o + 0.5 / zoom)).max() <= 0.25 / zoom + 1e-4


def constant(values, h, w):
    """(1, C, h, w) with channel c equal to values[c]."""
    return torch.tensor(values, dtype=torch.float32)[None, :, None, None].expand(1, len(values), h, w).clone()


def test_aggregate_two_scales_and_flip():
    perm = np.array([0, 2, 1])
    stages = lambda heat0, tag0, heat1, h: [constant(heat0 + tag0, h, h), constant(heat1, 2 * h, 2 * h)]
    outputs = [stages([1, 2, 3], [10, 20, 30], [3, 4, 5], 4),        # scale 1
               stages([0, 0, 0], [99, 99, 99], [2, 2, 2], 2)]        # scale 0.5
    flipped = [stages([5, 6, 7], [40, 50, 60], [7, 8, 9], 4),
               stages([1, 2, 3], [99, 99, 99], [3, 4, 5], 2)]
    heatmaps, tags = g.aggregate(outputs, 3, (12, 8), (1.0, 0.5), flipped, perm)
    assert heatmaps.shape == (1, 3, 8, 12) and tags.shape == (1, 3, 8, 12, 2)
    # scale 1: stages [2, 3, 4], flipped back [6, 8, 7] -> [4, 5.5, 5.5]; scale 0.5: [1, 1, 1] and
    # [2, 4, 3] -> [1.5, 2.5, 2]; the mean of the scales
    assert torch.allclose(heatmaps, constant([2.75, 4.0, 3.75], 8, 12))
    # tags of scale 1 only: the image's, then the mirror's with its channels permuted
    assert torch.allclose(tags[..., 0], constant([10, 20, 30], 8, 12))
    assert torch.allclose(tags[..., 1], constant([40, 60, 50], 8, 12))
    # without the flip: the image's stages only
    heatmaps, tags = g.aggregate(outputs, 3, (12, 8), (1.0, 0.5))
    assert torch.allclose(heatmaps, constant([1.5, 2.0, 2.5], 8, 12)) and tags.shape[-1] == 1
    with pytest.raises(ValueError):
        g.aggregate(outputs, 3, (12, 8), (0.75, 0.5))            # the tags come from scale 1


def test_aggregate_mirrors_the_flipped_outputs():
    perm = COCO.flip_permutation()
    out = [torch.zeros(1, 2 * K, 4, 4), torch.zeros(1, K, 8, 8)]
    flipped = [torch.zeros(1, 2 * K, 4, 4), torch.zeros(1, K, 8, 8)]
    flipped[1][0, 1, 2, 1] = 1.0                 # l_eye of the mirrored image at x 1, y 2
    heatmaps, tags = g.aggregate([out], K, (8, 8), (1.0,), [flipped], perm)
    expected = torch.zeros(1, K, 8, 8)
    expected[0, 2, 2, 8 - 1 - 1] = 0.25          # r_eye at the mirrored x; / 2 stages / 2 flips
    assert torch.equal(heatmaps, expected)
    assert tags.shape == (1, K, 8, 8, 2)


def test_stage_outputs_selection():
    out = [constant([1, 2, 5, 6], 2, 2), constant([3, 4], 4, 4)]
    heat, tags = g.stage_outputs(out, 2)
    assert heat.shape == (1, 2, 4, 4) and torch.allclose(heat, constant([2, 3], 4, 4))
    assert len(tags) == 1 and torch.allclose(tags[0], constant([5, 6], 4, 4))
    heat, tags = g.stage_outputs(out, 2, use_heatmaps=(False, True), use_tags=(False, False))
    assert torch.allclose(heat, constant([3, 4], 4, 4)) and tags == []
