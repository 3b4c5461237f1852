"""Associative embedding (Newell et al. 2017) as HigherHRNet (Cheng et al., CVPR 2020) uses it:
the losses, the grouping of one image's detections into people, and the test-time helpers
(multi-scale input sizes, aggregation of scales and the flip, mapping back to the image).

Pure functions, numerically matching the authors' code (HRNet/HigherHRNet-Human-Pose-Estimation,
``lib/core/loss.py``, ``lib/core/group.py``, ``lib/core/inference.py``,
``lib/utils/transforms.py``); the optimal assignment is scipy's ``linear_sum_assignment`` where
the authors use munkres (the same assignment when the optimum is unique).

Conventions. One tag per joint (TAG_PER_JOINT): the tag maps have the heatmaps' shape.
A person is a (K, 3 + L) array of rows [x, y, score, tag_1 .. tag_L] in map pixels; a missing
joint is a zero row. ``parse`` places a peak at map pixel (column c, row r) at
(c + 0.5 +- 0.25, r + 0.5 +- 0.25), the authors' convention, and ``final_people`` maps it back
with the inverse of the centre/scale affine, as their ``get_final_preds``. Sizes are (W, H).

Test time, for one image (the authors' ``tools/valid.py``):

1. ``size, center, scale = multi_scale_size((w, h), input_size, 1.0, min(scales))``: the
   projection size (the input size at scale 1);
2. per scale s (the authors go from the largest down): ``multi_scale_size((w, h), input_size, s,
   min(scales))`` and ``scale_affine`` give the input size and the affine to warp the image with;
   run the model on it (and on its mirror image, for the flip test);
3. ``heatmaps, tags = aggregate(outputs, K, size, scales, flipped, flip_perm)``;
4. ``people, scores = parse(heatmaps[0], tags[0])``;
5. ``final_people(people, center, scale, size)``: [x, y] in original-image pixels. The authors
   pass the centre/scale of the last scale of their loop, the smallest: only scale[0] matters,
   and for a landscape image it can differ from scale 1's by a truncation (~0.1%) when
   s / min(scales) is not an integer; at a single scale (their default) the two are the same.
"""
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from datasets.pipeline import affine_matrix, heatmap_to_original

# The order in which the authors group COCO's 17 joints (their ``Params.joint_order``): the head,
# the shoulders, the hips, then the arms and the legs.
COCO_JOINT_ORDER = (0, 1, 2, 3, 4, 5, 6, 11, 12, 7, 8, 9, 10, 13, 14, 15, 16)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------

def heatmap_loss(pred, gt, mask):
    """Masked squared error per image: pred, gt (B, K, H, W), mask (B, H, W) -> (B,), the mean over
    joints and pixels of (pred - gt)^2 * mask (the authors' HeatmapLoss)."""
    return ((pred - gt) ** 2 * mask[:, None]).mean(dim=3).mean(dim=2).mean(dim=1)


def ae_loss(tags, joints, push_type='exp'):
    """Associative-embedding push and pull losses per image (the authors' AELoss, loss_type 'exp'
    or 'max').

    tags: (B, K, H, W) or (B, K*H*W) tag maps, one tag per joint.
    joints: (B, M, K, 2) integers: per person slot m, entries [flat index k*H*W + y*W + x into the
    tag map, flag]; an entry counts when flag > 0 (``tag_targets`` makes them).

    Per person with at least one counted entry: its reference tag is the mean of its tags, and
    its pull term the mean squared deviation of its tags from it. With n such people:
    pull = the mean of their pull terms (0 when n = 0), push = (sum over all ordered pairs i, j,
    i = j included, of exp(-(t_i - t_j)^2) - n) / ((n - 1) n) * 0.5 (0 when n < 2); with
    ``push_type`` 'max', max(0, 1 - |t_i - t_j|) in place of the exponential. 'exp' (HigherHRNet's
    setting) is flat where two people's tags are equal, so tags that start together (the N(0,
    0.001) initialisation) separate only slowly; 'max' pushes them apart at a constant rate.
    -> push (B,), pull (B,).
    """
    b = tags.shape[0]
    flat = tags.reshape(b, -1)
    joints = torch.as_tensor(joints, device=flat.device).long()
    m, k = joints.shape[1], joints.shape[2]
    counted = (joints[..., 1] > 0).to(flat.dtype)                        # (B, M, K)
    index = joints[..., 0].clamp(min=0) * (joints[..., 1] > 0).long()     # padded -> 0, harmless
    values = flat.gather(1, index.reshape(b, m * k)).reshape(b, m, k)
    count = counted.sum(dim=2)                                           # (B, M)
    person = (count > 0).to(flat.dtype)
    mean = (values * counted).sum(dim=2) / count.clamp(min=1)            # (B, M)
    pull_each = ((values - mean[..., None]) ** 2 * counted).sum(dim=2) / count.clamp(min=1)
    n = person.sum(dim=1)                                                # (B,)
    pull = (pull_each * person).sum(dim=1) / n.clamp(min=1)
    pairs = person[:, :, None] * person[:, None, :]
    diff = mean[:, :, None] - mean[:, None, :]
    if push_type == 'exp':
        near = torch.exp(-diff ** 2)
    elif push_type == 'max':
        near = (1 - diff.abs()).clamp(min=0)
    else:
        raise ValueError(f"push_type must be 'exp' or 'max', not {push_type!r}")
    similar = (near * pairs).sum(dim=(1, 2))
    push = torch.where(n >= 2, (similar - n) / ((n - 1) * n).clamp(min=1) * 0.5,
                       torch.zeros_like(n))
    return push, pull


def tag_targets(keypoints, visible, size, max_people=30):
    """The ``joints`` of ``ae_loss`` for one image (the authors' JointsGenerator, TAG_PER_JOINT).

    keypoints: (N, K, 2) in map pixels; visible: (N, K); size: the map's int (square) or (W, H).
    A joint counts when visible > 0 and its truncated position (int(x), int(y)) lies on the map;
    each person's counted joints are packed from slot 0, in joint order, as entries
    [k*H*W + int(y)*W + int(x), 1]. People beyond ``max_people`` are left out.
    -> (max_people, K, 2) int64, zero where unused.
    """
    w, h = (size, size) if np.isscalar(size) else size
    keypoints = np.asarray(keypoints, np.float64)
    visible = np.asarray(visible)
    k = keypoints.shape[1] if keypoints.ndim == 3 else visible.shape[-1]
    out = np.zeros((max_people, k, 2), np.int64)
    for p in range(min(len(keypoints), max_people)):
        x = np.trunc(keypoints[p, :, 0]).astype(np.int64)
        y = np.trunc(keypoints[p, :, 1]).astype(np.int64)
        ok = (visible[p] > 0) & (x >= 0) & (y >= 0) & (x < w) & (y < h)
        joint = np.nonzero(ok)[0]
        out[p, :len(joint), 0] = joint * h * w + y[joint] * w + x[joint]
        out[p, :len(joint), 1] = 1
    return out


# ----------------------------------------------------------------------------------------------
# Grouping one image (the authors' HeatmapParser)
# ----------------------------------------------------------------------------------------------

def _tensor(x):
    return x.detach().float().cpu() if torch.is_tensor(x) else torch.as_tensor(np.asarray(x, np.float32))


def _numpy(x):
    return x.detach().cpu().float().numpy() if torch.is_tensor(x) else np.asarray(x, np.float32)


def nms(heatmaps, kernel=5):
    """heatmaps (K, H, W) tensor -> the same with every value that is not the maximum of its
    kernel x kernel neighbourhood set to 0."""
    peak = F.max_pool2d(heatmaps[None], kernel, 1, (kernel - 1) // 2)[0]
    return heatmaps * (peak == heatmaps).float()


def top_k(heatmaps, tags, k=30, kernel=5):
    """The k highest peaks of each joint's map after ``nms``.

    heatmaps: (K, H, W); tags: (K, H, W, L). -> vals (K, k) float32, locs (K, k, 2) int64 [x, y],
    peak_tags (K, k, L) float32 (the tags at the peaks), best first.
    """
    det = _tensor(heatmaps)
    tags = _tensor(tags)
    nj, h, w = det.shape
    vals, index = nms(det, kernel).reshape(1, nj, h * w).topk(min(k, h * w), dim=2)
    vals, index = vals[0], index[0]
    flat = tags.reshape(nj, h * w, -1)
    peak_tags = torch.gather(flat, 1, index[..., None].expand(-1, -1, flat.shape[2]))
    locs = torch.stack((index % w, index // w), dim=2)
    return vals.numpy(), locs.numpy(), peak_tags.numpy()


def _joint_order(num_joints, joint_order):
    if joint_order is not None:
        return list(joint_order)
    return list(COCO_JOINT_ORDER) if num_joints == len(COCO_JOINT_ORDER) else list(range(num_joints))


class _Groups:
    """People under construction, in creation order. As in the authors' code, a person is keyed by
    the first tag value of the joint that started it: a new joint whose first tag equals an
    existing key joins (and restarts the tag list of) that person instead of starting one."""

    def __init__(self, num_joints, width):
        self.shape = (num_joints, width)
        self.people, self.tags, self.key = [], [], {}

    def start(self, joint, row, tag):
        key = tag[0]
        if key not in self.key:
            self.key[key] = len(self.people)
            self.people.append(np.zeros(self.shape))
            self.tags.append(None)
        p = self.key[key]
        self.people[p][joint] = row
        self.tags[p] = [tag]

    def add(self, p, joint, row, tag):
        self.people[p][joint] = row
        self.tags[p].append(tag)

    def mean_tags(self, count):
        """(count, L) mean tag of each of the first ``count`` people."""
        return np.array([np.mean(t, axis=0) for t in self.tags[:count]])

    def array(self):
        if not self.people:
            return np.zeros((0,) + self.shape, np.float32)
        return np.array(self.people).astype(np.float32)


def match_by_tag(vals, locs, peak_tags, joint_order=None, detection_threshold=0.1,
                 tag_threshold=1.0, max_num_people=30, use_detection_val=True,
                 ignore_too_much=False, assign=linear_sum_assignment):
    """Group the peaks of ``top_k`` into people (the authors' match_by_tag).

    vals (K, P), locs (K, P, 2) [x, y], peak_tags (K, P, L). Joints are taken in ``joint_order``
    (default: COCO_JOINT_ORDER for 17 joints, else 0..K-1); a joint's peaks above
    ``detection_threshold`` start people when there are none yet, else are assigned to the first
    ``max_num_people`` people by the optimal assignment on the distance d between a peak's tag and
    a person's mean tag (cost round(d) * 100 - score with ``use_detection_val``, else d). A peak
    joins its person when d < ``tag_threshold``; an unassigned or too distant peak starts a new
    person. ``ignore_too_much``: skip a joint once ``max_num_people`` people exist. ``assign``:
    cost (P, G) with P <= G -> (rows, cols) of a minimum-cost assignment of every row, ascending
    rows (scipy's by default; the authors' munkres picks the same one unless the optimum is tied,
    which the rounding of ``use_detection_val`` makes common).
    -> (N, K, 3 + L) float32 people, rows [x, y, score, tags], in creation order.
    """
    nj, _, nl = peak_tags.shape
    groups = _Groups(nj, 3 + nl)
    for joint in _joint_order(nj, joint_order):
        rows = np.concatenate((locs[joint], vals[joint, :, None], peak_tags[joint]), axis=1)
        keep = rows[:, 2] > detection_threshold
        rows, tags = rows[keep], peak_tags[joint][keep]
        if len(rows) == 0:
            continue
        if not groups.people:
            for row, tag in zip(rows, tags):
                groups.start(joint, row, tag)
            continue
        grouped = min(len(groups.people), max_num_people)
        if ignore_too_much and grouped == max_num_people:
            continue
        dist = np.linalg.norm(rows[:, None, 3:] - groups.mean_tags(grouped)[None], ord=2, axis=2)
        cost = np.round(dist) * 100 - rows[:, 2:3] if use_detection_val else dist.copy()
        if len(rows) > grouped:
            cost = np.concatenate((cost, np.full((len(rows), len(rows) - grouped), 1e10)), axis=1)
        for r, c in zip(*assign(cost)):
            if c < grouped and dist[r, c] < tag_threshold:
                groups.add(c, joint, rows[r], tags[r])
            else:
                groups.start(joint, rows[r], tags[r])
    return groups.array()


def adjust_people(people, heatmaps):
    """people (N, K, 3 + L) with integer [x, y], heatmaps (K, H, W) (before NMS) -> a copy with
    each detected joint (score > 0) at [x + 0.5 +- 0.25, y + 0.5 +- 0.25] (the authors' adjust)."""
    people = np.array(people, np.float32, copy=True)
    heatmaps = np.asarray(heatmaps, np.float32)
    n, j = np.nonzero(people[:, :, 2] > 0)
    x = people[n, j, 0].astype(np.int64)
    y = people[n, j, 1].astype(np.int64)
    dx, dy = _quarter(heatmaps, j, x, y)
    people[n, j, 0] += dx + 0.5
    people[n, j, 1] += dy + 0.5
    return people


def _quarter(heatmaps, joint, x, y):
    """The quarter-pixel shifts (dx, dy) of integer points joint, x, y (P,) on heatmaps (K, H, W):
    towards the higher of each pair of neighbours, -0.25 on a tie (the authors' rule)."""
    _, h, w = heatmaps.shape
    right = heatmaps[joint, y, np.minimum(x + 1, w - 1)] > heatmaps[joint, y, np.maximum(x - 1, 0)]
    below = heatmaps[joint, np.minimum(y + 1, h - 1), x] > heatmaps[joint, np.maximum(y - 1, 0), x]
    return np.where(right, 0.25, -0.25), np.where(below, 0.25, -0.25)


def refine_person(person, heatmaps, tags):
    """Fill the joints a person lacks (the authors' refine).

    person (K, 3 + L) with at least one joint of score > 0; heatmaps (K, H, W) (before NMS);
    tags (K, H, W, L). The person's tag is the mean of the tags at its detected joints (at the
    integer parts of their [x, y]); for each joint the position maximising
    heatmap - round(|tag - person's tag|) is its candidate, at [x + 0.5 +- 0.25, y + 0.5 +- 0.25]
    with score the heatmap there; a missing joint (score 0) takes its candidate when that score
    is > 0. -> a copy of ``person``, float32 (the tag columns of filled joints stay 0).
    """
    person = np.array(person, np.float32, copy=True)
    heatmaps = np.asarray(heatmaps, np.float32)
    tags = np.asarray(tags, np.float32)
    if tags.ndim == 3:
        tags = tags[..., None]
    _, h, w = heatmaps.shape
    found, joint = np.nonzero(person[:, 2] > 0)[0], np.nonzero(person[:, 2] == 0)[0]
    if len(found) == 0 or len(joint) == 0:
        return person
    xy = person[found, :2].astype(np.int32)
    mine = tags[found, xy[:, 1], xy[:, 0]].mean(axis=0)                  # (L,)
    dist = (((tags[joint] - mine[None, None, None, :]) ** 2).sum(axis=3)) ** 0.5
    best = (heatmaps[joint] - np.round(dist)).reshape(len(joint), -1).argmax(axis=1)
    y, x = best // w, best % w
    val = heatmaps[joint, y, x]
    dx, dy = _quarter(heatmaps, joint, x, y)
    fill = val > 0
    person[joint[fill], 0] = (x + 0.5 + dx)[fill]
    person[joint[fill], 1] = (y + 0.5 + dy)[fill]
    person[joint[fill], 2] = val[fill]
    return person


def parse(heatmaps, tags, max_num_people=30, detection_threshold=0.1, tag_threshold=1.0,
          use_detection_val=True, ignore_too_much=False, nms_kernel=5, adjust=True, refine=True,
          joint_order=None, assign=linear_sum_assignment):
    """People of one image from its heatmaps and tags (the authors' HeatmapParser.parse).

    heatmaps: (K, H, W); tags: (K, H, W, L) (or (K, H, W) for L = 1; (1, H, W, L) for one tag map
    shared by all joints); numpy or torch. Steps: ``top_k`` (NMS with ``nms_kernel``, the
    ``max_num_people`` best peaks per joint), ``match_by_tag`` (with ``joint_order``, ``assign``
    and the thresholds), then ``adjust_people`` and, per person, ``refine_person``.
    -> people (N, K, 3 + L) float32 rows [x, y, score, tags] in map pixels, scores (N,) float32:
    a person's score is the mean over all K joints of their scores (0 for a missing one), taken
    after ``adjust`` and before ``refine``, as the authors do.
    """
    heatmaps, tags = _numpy(heatmaps), _numpy(tags)
    if tags.ndim == 3:
        tags = tags[..., None]
    if tags.shape[0] != heatmaps.shape[0]:
        tags = np.broadcast_to(tags, heatmaps.shape + tags.shape[3:])
    vals, locs, peak_tags = top_k(heatmaps, tags, max_num_people, nms_kernel)
    people = match_by_tag(vals, locs, peak_tags, joint_order, detection_threshold, tag_threshold,
                          max_num_people, use_detection_val, ignore_too_much, assign)
    if adjust:
        people = adjust_people(people, heatmaps)
    scores = people[:, :, 2].mean(axis=1) if len(people) else np.zeros(0, np.float32)
    if refine:
        people = np.array([refine_person(p, heatmaps, tags) for p in people], np.float32) \
            .reshape(people.shape)
    return people, scores


# ----------------------------------------------------------------------------------------------
# Test time: input sizes, aggregation, mapping back
# ----------------------------------------------------------------------------------------------

def multi_scale_size(image_size, input_size, current_scale, min_scale):
    """The input size of one test scale (the authors' get_multi_scale_size).

    image_size: (w, h) of the original image; input_size: the training input size (512);
    current_scale, min_scale: this scale factor and the smallest one tested. At ``min_scale`` the
    shorter side becomes min_scale * input_size and the longer one follows the aspect ratio,
    each rounded up to a multiple of 64; other scales are those sizes times
    current_scale / min_scale (truncated).
    -> (W, H) ints, center (2,) (the image centre, rounded), scale (2,) (the box / 200 that
    ``scale_affine`` maps onto (W, H): the shorter side and the longer side at the input's
    aspect ratio).
    """
    w, h = image_size
    center = np.array([int(w / 2.0 + 0.5), int(h / 2.0 + 0.5)])
    base = int((min_scale * input_size + 63) // 64 * 64)
    short, long_ = (w, h) if w < h else (h, w)
    short_size = int(base * current_scale / min_scale)
    long_size = int(int((base / short * long_ + 63) // 64 * 64) * current_scale / min_scale)
    if w < h:
        size = (short_size, long_size)
        scale = np.array([w / 200.0, long_size / short_size * w / 200.0])
    else:
        size = (long_size, short_size)
        scale = np.array([long_size / short_size * h / 200.0, h / 200.0])
    return size, center, scale


def scale_affine(center, scale, size):
    """2x3 matrix from original-image pixels to a map of ``size`` (W, H) for a centre/scale of
    ``multi_scale_size`` (the authors' get_affine_transform without rotation: the box width
    scale[0] * 200 onto W, the same zoom along y, ``center`` onto (W / 2, H / 2))."""
    return affine_matrix(center, float(np.asarray(scale).reshape(-1)[0]) * 200.0, size)


def final_people(people, center, scale, heatmap_size):
    """people (N, K, 3 + L) with [x, y] on a map of ``heatmap_size`` (W, H) -> a float32 copy with
    [x, y] in original-image pixels: the inverse of ``scale_affine``, solved from the same float32
    points as the authors' get_final_preds (``pipeline.heatmap_to_original``)."""
    people = np.array(people, np.float32, copy=True)
    box = (center[0], center[1], float(np.asarray(scale).reshape(-1)[0]) * 200.0, 0.0, 0.0)
    people[..., :2] = heatmap_to_original(people[..., :2], box, heatmap_size)
    return people


def _resize(x, size):
    """(B, C, h, w) -> (B, C, H, W) bilinear (align_corners False); size (W, H)."""
    return F.interpolate(x, size=(size[1], size[0]), mode='bilinear', align_corners=False)


def stage_outputs(outputs, num_joints, flip_perm=None, use_heatmaps=None, use_tags=None):
    """One forward pass's stage outputs -> (heatmaps, tags) at the last stage's resolution (the
    authors' get_multi_stage_outputs for one of the image and its mirror).

    outputs: a tensor or a list of stage tensors (B, C_s, h_s, w_s), lowest resolution first; a
    stage's first ``num_joints`` channels are heatmaps, the rest (if any) tags. Every stage but
    the last is resized (bilinear) to the last one's size. flip_perm: (K,) index array when these
    are the outputs of the mirrored image: each is mirrored back along x and its heatmap (and tag)
    channels permuted, channel i <- flip_perm[i]. use_heatmaps / use_tags: per stage, whether it
    contributes (default: heatmaps of every stage, tags of every stage that has them).
    -> heatmaps (B, K, h, w), the mean over the contributing stages, and the list of tag maps
    (B, K, h, w) of the contributing stages.
    """
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    size = (outputs[-1].shape[3], outputs[-1].shape[2])
    perm = slice(None) if flip_perm is None else torch.as_tensor(np.asarray(flip_perm), dtype=torch.long)
    total, count, tags = 0, 0, []
    for i, out in enumerate(outputs):
        if i != len(outputs) - 1:
            out = _resize(out, size)
        if flip_perm is not None:
            out = torch.flip(out, [3])
        if use_heatmaps is None or use_heatmaps[i]:
            total = total + out[:, :num_joints][:, perm]
            count += 1
        has_tags = out.shape[1] > num_joints
        if has_tags and (use_tags is None or use_tags[i]):
            tags.append(out[:, num_joints:][:, perm])
    if count == 0:
        raise ValueError('no stage contributes heatmaps')
    return total / count, tags


def aggregate(outputs, num_joints, size, scales=(1.0,), flipped=None, flip_perm=None,
              use_heatmaps=None, use_tags=None):
    """Combine the outputs of several test scales and the flip (the authors' get_multi_stage_outputs
    with PROJECT2IMAGE and aggregate_results).

    outputs: per scale (in the order of ``scales``), the model's outputs as ``stage_outputs`` takes
    them; flipped: likewise for the mirrored inputs (model outputs as they come, not flipped
    back), or None for no flip test; flip_perm: (K,) (``JointSet.flip_permutation()``), needed
    with ``flipped``; size: (W, H) every map is resized to (bilinear), the input size at scale 1.
    The heatmaps are averaged over the image and its mirror, then over the scales; the tags are
    those of the scale 1 (or of the only scale), the image's stages then the mirror's,
    stacked along a last axis.
    -> heatmaps (B, K, H, W), tags (B, K, H, W, L).
    """
    if flipped is not None and flip_perm is None:
        raise ValueError('the flip test needs flip_perm')
    final, tag_list = None, []
    for i, s in enumerate(scales):
        heat, tags = stage_outputs(outputs[i], num_joints, None, use_heatmaps, use_tags)
        heatmaps = [heat]
        if flipped is not None:
            heat_f, tags_f = stage_outputs(flipped[i], num_joints, flip_perm, use_heatmaps, use_tags)
            heatmaps.append(heat_f)
            tags = tags + tags_f
        heatmaps = [_resize(hm, size) for hm in heatmaps]
        if s == 1 or len(scales) == 1:
            tag_list += [_resize(t, size)[..., None] for t in tags]
        mean = (heatmaps[0] + heatmaps[1]) / 2.0 if flipped is not None else heatmaps[0]
        final = mean if final is None else final + mean
    if not tag_list:
        raise ValueError('no tags: the tags come from scale 1 (or the only scale), and no stage has any')
    return final / float(len(scales)), torch.cat(tag_list, dim=4)
