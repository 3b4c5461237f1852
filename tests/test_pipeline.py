import cv2
import numpy as np
import pytest

from datasets.joints import MPII
from datasets.pipeline import Pipeline, affine_matrix, crop_box, denormalize, invert_affine, to_original, transform_points


def dot_image(h, w, points):
    img = np.zeros((h, w, 3), np.uint8)
    for x, y in points:
        cv2.circle(img, (int(x), int(y)), 3, (255, 255, 255), -1)
    return img


def centroid(gray, near, radius=8):
    x0, y0 = int(near[0]) - radius, int(near[1]) - radius
    patch = gray[max(y0, 0):y0 + 2 * radius + 1, max(x0, 0):x0 + 2 * radius + 1].astype(np.float64)
    ys, xs = np.mgrid[max(y0, 0):max(y0, 0) + patch.shape[0], max(x0, 0):max(x0, 0) + patch.shape[1]]
    return np.array([(xs * patch).sum() / patch.sum(), (ys * patch).sum() / patch.sum()])


@pytest.mark.parametrize('rotation,flip', [(0, False), (25, False), (-40, True), (0, True)])
def test_keypoints_land_where_their_pixels_land(rotation, flip):
    points = np.array([[120, 90], [200, 160], [90, 210]], np.float64)
    img = dot_image(300, 320, points)
    m = affine_matrix((160, 150), 260, (128, 128), rotation, flip, shift=(7, -5))
    crop = cv2.warpAffine(img, m, (128, 128), flags=cv2.INTER_LINEAR)
    moved = transform_points(points, m)
    for p in moved:
        assert np.linalg.norm(centroid(crop[..., 0], p) - p) < 0.25


def test_pipeline_flip_swaps_joints_and_mirrors_pixels():
    record = dict(center=np.array([100.0, 100.0]), scale=np.array([1.0, 1.0]),
                  keypoints=np.tile([[60.0, 80.0]], (1, 16, 1)), visible=np.ones((1, 16)))
    record['keypoints'][0, 0] = [70, 120]  # r_ankle
    img = dot_image(200, 200, [record['keypoints'][0, 0]])
    pipe = Pipeline(100, MPII.flip_permutation(), train=True, max_scale=0, max_rotate=0, flip=True, color_jitter=0)
    for seed in range(20):
        out = pipe(img, record, np.random.default_rng(seed))
        if np.allclose(out['affine'][0, 0], -0.5):
            break
    else:
        pytest.fail('no flipped sample drawn')
    # r_ankle of the original is now l_ankle (index 5), mirrored about the crop centre
    assert np.allclose(out['keypoints'][0, 5], [100 - (70 - 100) * 0.5 - 50, (120 - 100) * 0.5 + 50])
    crop = denormalize(out['image'])[..., 0]
    assert np.linalg.norm(centroid(crop, out['keypoints'][0, 5]) - out['keypoints'][0, 5]) < 0.3


def test_inverse_affine_returns_to_original():
    m = affine_matrix((50.0, 70.0), 123.0, (64, 48), 33.0, True, (3.0, 2.0))
    pts = np.random.default_rng(1).uniform(0, 200, (2, 5, 2))
    crop = np.stack([transform_points(p, m) for p in pts])
    back = to_original(crop, np.stack([m, m]))
    assert np.allclose(back, pts, atol=1e-3)
    assert np.allclose(invert_affine(invert_affine(m)), m)


def test_training_augmentation_is_deterministic_per_generator():
    record = dict(center=np.array([64.0, 64.0]), scale=np.array([0.5, 0.5]),
                  keypoints=np.random.default_rng(0).uniform(30, 90, (1, 16, 2)), visible=np.ones((1, 16)))
    img = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    pipe = Pipeline(64, MPII.flip_permutation(), train=True)
    a = pipe(img, record, np.random.default_rng([0, 1, 2]))
    b = pipe(img, record, np.random.default_rng([0, 1, 2]))
    c = pipe(img, record, np.random.default_rng([0, 1, 3]))
    assert np.array_equal(a['image'].numpy(), b['image'].numpy())
    assert not np.array_equal(a['keypoints'], c['keypoints'])


def test_every_person_goes_through_the_same_matrix_and_flip():
    rng = np.random.default_rng(5)
    people = rng.uniform(40, 160, (3, 16, 2))
    record = dict(center=np.array([100.0, 100.0]), scale=np.array([1.0, 1.0]), keypoints=people,
                  visible=(rng.uniform(size=(3, 16)) > 0.3).astype(np.float32))
    img = np.zeros((200, 200, 3), np.uint8)
    pipe = Pipeline((96, 128), MPII.flip_permutation(), train=True, max_scale=0.2, max_rotate=30, flip=True)
    for seed in range(6):
        out = pipe(img, record, np.random.default_rng(seed))
        assert out['keypoints'].shape == (3, 16, 2) and out['visible'].shape == (3, 16)
        assert tuple(out['image'].shape) == (3, 128, 96)
        moved = transform_points(people.reshape(-1, 2), out['affine']).reshape(3, 16, 2)
        flipped = out['affine'][0, 0] < 0
        perm = MPII.flip_permutation() if flipped else np.arange(16)
        assert np.allclose(out['keypoints'], moved[:, perm], atol=1e-4)
        assert np.array_equal(out['visible'], record['visible'][:, perm])


def test_a_dot_in_a_256x192_crop_maps_back_within_half_a_pixel():
    """Non-square input: a tall person box is extended to 192 / 256, the dots painted at the
    joints land on the keypoints in the crop, and the inverse affine brings them back."""
    points = np.array([[300.0, 150.0], [260.0, 420.0], [345.0, 300.0]])
    img = dot_image(520, 640, points)
    # a box 150 wide and 300 high: extended to 225 x 300 for the 192 x 256 input
    record = dict(center=np.array([300.0, 280.0]), scale=np.array([150.0, 300.0]) / 200,
                  keypoints=points[None], visible=np.ones((1, 3)))
    assert crop_box(record['scale'], (192, 256)) == pytest.approx((225.0, 300.0))
    out = Pipeline((192, 256), np.arange(3))(img, record)
    crop = denormalize(out['image'])[..., 0]
    assert crop.shape == (256, 192)
    for p in out['keypoints'][0]:
        assert np.linalg.norm(centroid(crop, p) - p) < 0.5
    found = np.stack([centroid(crop, p) for p in out['keypoints'][0]])
    back = to_original(found[None], out['affine'][None])[0]
    assert np.abs(back - points).max() < 0.5
    # the extended box fills the crop exactly: zoom 192 / 225 along both axes
    assert np.allclose(np.abs(np.linalg.det(out['affine'][:, :2])), (192 / 225) ** 2, rtol=1e-5)


def test_udp_affine_maps_the_box_onto_pixel_centres_and_mirrors_exactly():
    from datasets.pipeline import udp_affine_matrix
    m = udp_affine_matrix((300.0, 200.0), (150.0, 200.0), (192, 256))
    assert np.allclose(transform_points([[300.0, 200.0]], m), [[95.5, 127.5]])
    # the box's left and right edges land on the first and last pixel centres
    assert np.allclose(transform_points([[225.0, 100.0], [375.0, 300.0]], m), [[0.0, 0.0], [191.0, 255.0]])
    f = udp_affine_matrix((300.0, 200.0), (150.0, 200.0), (192, 256), flip=True)
    pts = np.random.default_rng(0).uniform(150, 350, (10, 2))
    a, b = transform_points(pts, m), transform_points(pts, f)
    assert np.allclose(b[:, 0], 191 - a[:, 0]) and np.allclose(b[:, 1], a[:, 1])
    # pixels follow: a dot lands where its keypoint lands, and the flipped crop is the mirror image
    points = np.array([[280.0, 150.0], [330.0, 260.0]])
    img = dot_image(400, 500, points)
    record = dict(center=np.array([300.0, 200.0]), scale=np.array([150.0, 200.0]) / 200,
                  keypoints=points[None], visible=np.ones((1, 2)))
    out = Pipeline((192, 256), np.arange(2), udp=True)(img, record)
    crop = denormalize(out['image'])[..., 0]
    for p in out['keypoints'][0]:
        assert np.linalg.norm(centroid(crop, p) - p) < 0.5
    mirrored = cv2.warpAffine(img, f, (192, 256), flags=cv2.INTER_LINEAR)
    straight = cv2.warpAffine(img, m, (192, 256), flags=cv2.INTER_LINEAR)
    assert np.abs(mirrored[:, ::-1].astype(int) - straight).max() <= 1


def test_half_body_crops_the_upper_or_lower_body_as_hrnet():
    from datasets.joints import COCO
    from datasets.pipeline import half_body_box
    rng = np.random.default_rng(0)
    kp = rng.uniform(50, 250, (17, 2)).astype(np.float32)
    vis = np.ones(17)
    picks = set()
    for seed in range(40):
        c, s = half_body_box(kp, vis, COCO.upper_body, (192, 256), np.random.default_rng(seed))
        part = kp[:11] if np.allclose(c, kp[:11].mean(0)) else kp[11:]
        picks.add(len(part))
        assert np.allclose(c, part.mean(0), atol=1e-4)
        w, h = part.max(0) - part.min(0)
        w, h = (w, w / 0.75) if w > 0.75 * h else (h * 0.75, h)
        assert np.allclose(s, np.array([w, h]) / 200 * 1.5, rtol=1e-5)
    assert picks == {11, 6}                      # both halves are drawn
    vis_upper_only = np.r_[np.ones(11), np.zeros(6)]
    c, _ = half_body_box(kp, vis_upper_only, COCO.upper_body, (192, 256), np.random.default_rng(3))
    assert np.allclose(c, kp[:11].mean(0))       # the lower body has no joints: the upper one
    # in the pipeline: training only, for people with more than halfBodyJoints labelled joints
    record = dict(center=np.array([150.0, 150.0]), scale=np.array([1.5, 1.5]), keypoints=kp[None], visible=vis[None])
    img = np.zeros((300, 300, 3), np.uint8)
    on = Pipeline((192, 256), COCO.flip_permutation(), train=True, max_scale=0, max_rotate=0, flip=False,
                  color_jitter=0, half_body=(1.0, 8, COCO.upper_body))
    off = Pipeline((192, 256), COCO.flip_permutation(), train=True, max_scale=0, max_rotate=0, flip=False,
                   color_jitter=0)
    zoom = lambda out: abs(out['affine'][0, 0])
    assert zoom(on(img, record, np.random.default_rng(1))) > zoom(off(img, record, np.random.default_rng(1)))
    few = dict(record, visible=np.r_[np.ones(8), np.zeros(9)][None])
    assert zoom(on(img, few, np.random.default_rng(1))) == zoom(off(img, few, np.random.default_rng(1)))
    evaluation = Pipeline((192, 256), COCO.flip_permutation(), half_body=(1.0, 8, COCO.upper_body))
    assert zoom(evaluation(img, record)) == pytest.approx(192 / 300)


@pytest.mark.parametrize('ext', ['.jpg', '.png'])
@pytest.mark.parametrize('box,factor', [(2.4, 2), (4.6, 4), (9.5, 8)])
def test_reduced_decode_keeps_every_dot_within_half_a_pixel(tmp_path, ext, box, factor):
    """Training crops that shrink the person box by 2x, 4x or 8x decode the file that many times
    smaller; the corrected affine puts every painted dot on its keypoint in the crop."""
    from datasets.base import read_image
    size = 64
    box_w = box * size
    centre = np.array([700.0, 520.0])
    angles = np.deg2rad(np.arange(6) * 60.0 + 17)      # on a ring: 0.3 box apart, well separated
    points = centre + 0.3 * box_w * np.stack([np.cos(angles), np.sin(angles)], 1)
    radius = int(round(2.0 * box_w / size))          # two crop pixels
    img = np.zeros((1040, 1400, 3), np.uint8)
    for x, y in points:
        cv2.circle(img, (int(round(x * 16)), int(round(y * 16))), radius * 16, (255, 255, 255), -1,
                   lineType=cv2.LINE_AA, shift=4)
    path = str(tmp_path / f'dots{ext}')
    cv2.imwrite(path, img, [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == '.jpg' else [])
    record = dict(center=centre, scale=np.array([box_w, box_w]) / 200, keypoints=points[None],
                  visible=np.ones((1, 6)))
    pipe = Pipeline(size, np.arange(6), train=True, color_jitter=0, reduced_decode=True)
    for seed in range(4):
        plan = pipe.plan(record, np.random.default_rng(seed))
        # the drawn scale moves the box by up to 25 %: the factor follows it, never past the shrink
        assert plan['reduce'] <= max(1, plan['box'][2] / size)
        assert plan['reduce'] in (factor // 2, factor, min(2 * factor, 8))
        small = read_image(path, plan['reduce'])
        assert small.shape[:2] == (-(-1040 // plan['reduce']), -(-1400 // plan['reduce']))
        out = pipe(small, record, plan=plan, reduced=plan['reduce'])
        full = pipe(read_image(path), record, plan=plan)
        assert np.array_equal(out['keypoints'], full['keypoints'])
        crop = denormalize(out['image'])[..., 0]
        for p in out['keypoints'][0]:
            assert np.linalg.norm(centroid(crop, p, radius=5) - p) < 0.5, (seed, plan['reduce'], p)
        # the same crop as the full decode, up to the averaging of the smaller file
        diff = np.abs(crop.astype(np.float64) - denormalize(full['image'])[..., 0])
        assert diff.mean() < 4


def test_reduced_decode_only_in_training_and_never_for_readers_that_draw_their_images():
    from datasets.base import Reader
    record = dict(center=np.array([500.0, 500.0]), scale=np.array([5.0, 5.0]),
                  keypoints=np.zeros((1, 3, 2)), visible=np.ones((1, 3)))
    assert Pipeline(64, np.arange(3), train=True, reduced_decode=True).plan(record, np.random.default_rng(0))['reduce'] == 8
    assert Pipeline(64, np.arange(3), train=True, reduced_decode=False).plan(record, np.random.default_rng(0))['reduce'] == 1
    assert Pipeline(64, np.arange(3), train=False, reduced_decode=True).plan(record, np.random.default_rng(0))['reduce'] == 1

    class Drawn(Reader):
        def load_image(self, record):
            return np.full((40, 50, 3), 7, np.uint8)
    image, reduced = Drawn.load_image_reduced(Drawn.__new__(Drawn), {}, 4)
    assert reduced == 1 and image.shape == (40, 50, 3)


def test_colour_gain_inside_normalize_is_the_gained_image_normalised():
    """The training colour gain, applied per channel plane inside ``normalize``: bit for bit
    ``normalize(clip(image * gain, 0, 255))`` in float32, saturating at 255."""
    import torch
    from datasets.pipeline import normalize
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    image[0, 0] = 255
    gain = np.array([1.2, 0.8, 1.05], np.float32)
    ours = normalize(image, gain)
    assert torch.equal(ours, normalize(np.clip(image.astype(np.float32) * gain, 0, 255)))
    assert torch.equal(ours[0, 0, 0], normalize(np.full((1, 1, 3), 255, np.uint8))[0, 0, 0])  # clipped at 255
    assert not torch.equal(ours, normalize(image))
