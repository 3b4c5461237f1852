"""Pose metrics: small pure numpy functions, plus thin wrappers for the official protocols.

Shapes used throughout:
  N persons, K joints;
  pred, gt      (N, K, 2) float, pixels, x then y;
  visible       (N, K) 0/1, 1 for a labelled joint (only those are scored);
  normalizer    (N,) float, the per-person length a distance is compared with.

Official protocols reproduced here:
  MPII  PCKh@0.5 from ``gt_valid.mat`` (as the MPII / HRNet evaluator),
  LSP   PCK@0.2 with the torso diameter ||left shoulder - right hip|| (Sapp & Taskar),
  LIP   PCKh@0.5 with the head segment ||head top - upper neck|| (no 0.6 factor),
  COCO  OKS AP through pycocotools, after the HRNet rescoring and OKS-NMS.

The official files are read by ``datasets.formats``; a bad file or input is a ``DatasetError``
naming it, in one line.
"""
import contextlib
import io
import math

import numpy as np

from datasets.formats import fail as _fail, load_json, read_gt_valid
from datasets.joints import COCO, LSP, MPII
from utils.errors import DatasetError

__all__ = [
    'heatmap_accuracy', 'pck', 'pckh_table', 'mpii_official', 'lsp_pck_table', 'lip_pckh_table',
    'lip_head_size', 'lsp_torso_size', 'oks_nms', 'coco_oks_ap', 'coco_keypoint_ap', 'COCO_STATS', 'format_table',
    'format_per_joint', 'topk_accuracy',
]


# ---------------------------------------------------------------------------------------------
# Pure metrics
# ---------------------------------------------------------------------------------------------

def _argmax_2d(maps):
    """maps (N, K, H, W) -> coords (N, K, 2) float (x, y) of each map's maximum, maxvals (N, K)."""
    n, k, h, w = maps.shape
    flat = maps.reshape(n, k, h * w)
    idx = flat.argmax(axis=2)
    maxvals = np.take_along_axis(flat, idx[..., None], axis=2)[..., 0]
    coords = np.stack([idx % w, idx // w], axis=-1).astype(np.float64)
    return coords, maxvals


def heatmap_accuracy(output, target, thr=0.5):
    """Training accuracy of the HRNet / SimpleBaselines code, on heatmaps.

    output, target: (N, K, H, W) numpy arrays (predicted and ground-truth heatmaps).
    Each map's argmax is its keypoint (a predicted map whose maximum is <= 0 gives (0, 0), as
    in the reference ``get_max_preds``). Distances are normalised per axis by a tenth of the map
    size, norm = (H / 10, W / 10) applied to (x, y) exactly as the reference code does (x by H,
    y by W; the same thing for square maps, and it keeps HRNet's numbers for 64x48 COCO maps).
    A (sample, joint) counts only where the target map has a peak (> 0); the reference tests
    "target coordinate > 1" instead, which also drops labelled joints on the map's first rows
    and columns.

    Returns (acc (K,), avg, cnt): acc[k] = fraction of counted distances < thr, -1 for a joint
    with no counted sample; avg = mean of acc over the joints with acc >= 0 (0 if none); cnt =
    number of those joints.
    """
    # float32 maps stay float32: their argmax and the sign of their maximum are the float64
    # copies' (a copy of each map cost more than the rest of the computation)
    output, target = (np.asarray(a) for a in (output, target))
    output, target = (a if a.dtype in (np.float32, np.float64) else a.astype(np.float64) for a in (output, target))
    if output.ndim != 4 or output.shape != target.shape:
        raise ValueError(f'heatmap_accuracy: output {output.shape} and target {target.shape} '
                         'must both be (N, K, H, W)')
    n, k, h, w = output.shape
    pred, pred_max = _argmax_2d(output)
    pred[pred_max <= 0] = 0
    gt, gt_max = _argmax_2d(target)
    norm = np.array([h, w], np.float64) / 10.0
    dist = np.linalg.norm((pred - gt) / norm, axis=-1)          # (N, K)
    counted = gt_max > 0                                           # (N, K)
    n_counted = counted.sum(axis=0)                                # (K,)
    hits = ((dist < thr) & counted).sum(axis=0)
    acc = np.full(k, -1.0)
    has = n_counted > 0
    acc[has] = hits[has] / n_counted[has]
    cnt = int(has.sum())
    avg = float(acc[has].mean()) if cnt else 0.0
    return acc, avg, cnt


def pck(pred, gt, visible, normalizer, alpha):
    """Percentage of correct keypoints.

    pred, gt: (N, K, 2); visible: (N, K); normalizer: (N,); alpha: float.
    A joint is correct when ||pred - gt|| / normalizer <= alpha (the official evaluators' form
    of ||pred - gt|| <= alpha * normalizer). Only labelled joints (visible > 0) of persons whose
    normalizer is finite and > 0 count: a person with a zero normalizer is skipped, never
    divided by. A non-finite prediction of a counted joint is simply wrong.

    Returns (pck (K,) in percent, NaN where count is 0; count (K,) int, the counted joints).
    """
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    visible = np.asarray(visible)
    normalizer = np.asarray(normalizer, dtype=np.float64).reshape(-1)
    if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[2] != 2:
        raise ValueError(f'pck: pred {pred.shape} and gt {gt.shape} must both be (N, K, 2)')
    if visible.shape != pred.shape[:2] or normalizer.shape != pred.shape[:1]:
        raise ValueError(f'pck: visible {visible.shape} must be {pred.shape[:2]} and '
                         f'normalizer {normalizer.shape} must be ({pred.shape[0]},)')
    person_ok = np.isfinite(normalizer) & (normalizer > 0)                     # (N,)
    counted = (visible > 0) & person_ok[:, None]                               # (N, K)
    safe_norm = np.where(person_ok, normalizer, 1.0)
    with np.errstate(invalid='ignore'):
        err = np.linalg.norm(pred - gt, axis=-1) / safe_norm[:, None]          # (N, K)
        correct = (err <= alpha) & counted
    count = counted.sum(axis=0)
    with np.errstate(invalid='ignore', divide='ignore'):
        value = np.where(count > 0, 100.0 * correct.sum(axis=0) / np.maximum(count, 1), np.nan)
    return value, count


def _weighted_mean(values, counts, keep):
    """Mean of values[keep] weighted by counts[keep] (joints with count 0 carry no weight)."""
    values = np.asarray(values, np.float64)[keep]
    counts = np.asarray(counts, np.float64)[keep]
    total = counts.sum()
    if total == 0:
        return float('nan')
    return float(np.sum(np.where(counts > 0, values, 0.0) * counts) / total)


# Columns of the part tables: column -> joint names averaged (plain mean, as the official code).
_MPII_PARTS = (
    ('Head', ('head_top',)),
    ('Shoulder', ('l_shoulder', 'r_shoulder')),
    ('Elbow', ('l_elbow', 'r_elbow')),
    ('Wrist', ('l_wrist', 'r_wrist')),
    ('Hip', ('l_hip', 'r_hip')),
    ('Knee', ('l_knee', 'r_knee')),
    ('Ankle', ('l_ankle', 'r_ankle')),
)
_LSP_PARTS = (('Head', ('neck', 'head_top')),) + _MPII_PARTS[1:]


def _part_columns(values, names, parts):
    table = {}
    for column, joints in parts:
        table[column] = float(np.mean([values[names.index(j)] for j in joints]))
    return table


def pckh_table(pred, gt, visible, head_size, joint_set=MPII, alpha=0.5):
    """PCKh table of the 16-joint MPII layout (as the official MPII / HRNet evaluator).

    pred, gt: (N, 16, 2); visible: (N, 16); head_size: (N,) the PCKh normaliser, any 0.6
    factor already applied; joint_set: MPII or any set with the MPII joint names.

    Returns an insertion-ordered dict, values in percent: 'Head' (head top only), 'Shoulder',
    'Elbow', 'Wrist', 'Hip', 'Knee', 'Ankle' (mean of left and right), 'Mean' (all joints but
    pelvis and thorax, each weighted by its number of labelled instances), 'Mean@0.1' (the same
    at alpha 0.1), and 'per_joint': {joint name: PCKh at alpha}.
    """
    names = list(joint_set.names)
    missing = [n for _, js in _MPII_PARTS for n in js] + ['pelvis', 'thorax']
    missing = [n for n in missing if n not in names]
    if missing:
        raise ValueError(f'pckh_table: joint set {joint_set.name} lacks MPII joints {missing}')
    values, count = pck(pred, gt, visible, head_size, alpha)
    # HRNet's evaluator reports pckAll[11] as "Mean@0.1", which is the threshold 0.11 of its
    # np.arange(0, 0.51, 0.01) range (an indexing slip); we use exactly 0.1.
    values_01, _ = pck(pred, gt, visible, head_size, 0.1)
    keep = np.array([n not in ('pelvis', 'thorax') for n in names])
    table = _part_columns(values, names, _MPII_PARTS)
    table['Mean'] = _weighted_mean(values, count, keep)
    table['Mean@0.1'] = _weighted_mean(values_01, count, keep)
    table['per_joint'] = {n: float(v) for n, v in zip(names, values)}
    return table


def lsp_torso_size(gt):
    """gt (N, 14, 2) in LSP order -> (N,) torso diameter ||left shoulder (9) - right hip (2)||."""
    gt = np.asarray(gt, np.float64)
    return np.linalg.norm(gt[:, LSP.index('l_shoulder')] - gt[:, LSP.index('r_hip')], axis=-1)


def lsp_pck_table(pred, gt, visible, alpha=0.2):
    """PCK table of the 14-joint LSP layout (Sapp & Taskar's PCK, as the usual LSP evaluator).

    pred, gt: (N, 14, 2) LSP order; visible: (N, 14), the joints to score (the standard
    protocol scores all 14). Normaliser: the ground-truth torso diameter, ||left shoulder -
    right hip||. Returns 'Head' (mean of neck and head top), 'Shoulder', 'Elbow', 'Wrist', 'Hip',
    'Knee', 'Ankle' (left/right means), 'Mean' (all 14 joints weighted by counts), and
    'per_joint', values in percent.
    """
    gt = np.asarray(gt, np.float64)
    if gt.ndim != 3 or gt.shape[1:] != (14, 2):
        raise ValueError(f'lsp_pck_table: gt {gt.shape} must be (N, 14, 2)')
    values, count = pck(pred, gt, visible, lsp_torso_size(gt), alpha)
    names = list(LSP.names)
    table = _part_columns(values, names, _LSP_PARTS)
    table['Mean'] = _weighted_mean(values, count, np.ones(len(names), bool))
    table['per_joint'] = {n: float(v) for n, v in zip(names, values)}
    return table


def lip_head_size(gt):
    """gt (N, 16, 2) MPII order -> (N,) ||head top (9) - upper neck (8)||, NaN if unlabelled."""
    gt = np.asarray(gt, np.float64)
    return np.linalg.norm(gt[:, MPII.index('head_top')] - gt[:, MPII.index('upper_neck')], axis=-1)


def lip_pckh_table(pred, gt, visible, alpha=0.5):
    """PCKh of the LIP benchmark: 16 joints in MPII order, head size = ||head top - upper neck||
    of the ground truth (no 0.6 factor), unlabelled joints (visible 0, or NaN in gt) skipped,
    persons without a head segment skipped.

    pred, gt: (N, 16, 2); visible: (N, 16). Returns the columns of ``pckh_table``.
    """
    gt = np.asarray(gt, np.float64)
    visible = np.asarray(visible) > 0
    visible = visible & np.all(np.isfinite(gt), axis=-1)
    return pckh_table(pred, np.nan_to_num(gt), visible, lip_head_size(gt), MPII, alpha)


# ---------------------------------------------------------------------------------------------
# MPII's official ground truth
# ---------------------------------------------------------------------------------------------

def mpii_official(pred, gt_valid_path):
    """MPII validation PCKh from the official ``gt_valid.mat``.

    pred: (N, 16, 2) predictions in 1-BASED pixels (the pred.mat convention: the project's
    0-based coordinates + 1), in the order of the validation persons (N = 2958).
    gt_valid.mat holds pos_gt_src (16, 2, N) 1-based, jnt_missing (16, N), headboxes_src
    (2, 2, N). Head size = 0.6 * ||headbox corner 2 - corner 1||; visible = 1 - jnt_missing.
    Returns the ``pckh_table`` columns.
    """
    gt, visible, head = read_gt_valid(gt_valid_path)
    n = len(gt)
    pred = np.asarray(pred, np.float64)
    if pred.shape != (n, 16, 2):
        raise DatasetError(f'predictions have shape {pred.shape}, expected ({n}, 16, 2) '
                           f'for the {n} persons of {gt_valid_path}')
    return pckh_table(pred, gt, visible, head, MPII)


# ---------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------

COCO_STATS = ('AP', 'AP .5', 'AP .75', 'AP (M)', 'AP (L)', 'AR', 'AR .5', 'AR .75', 'AR (M)',
              'AR (L)')


def _keypoints_array(kpts, k=None):
    """17x3 or flat 51 (any K) -> (K, 3) float64."""
    a = np.asarray(kpts, np.float64).reshape(-1, 3)
    if k is not None and a.shape[0] != k:
        raise ValueError(f'{a.shape[0]} keypoints, expected {k}')
    return a


def _oks_one_to_many(kept, others, area_kept, areas_others, variances):
    """OKS of one instance against several, as HRNet's oks_iou with in_vis_thre=None.

    kept (K, 3), others (M, K, 3), areas (scalars / (M,)), variances (K,) = (2 sigma)^2.
    The scale is the mean of the two instances' areas; every keypoint counts.
    """
    d2 = ((others[:, :, :2] - kept[None, :, :2]) ** 2).sum(-1)                  # (M, K)
    scale = (area_kept + areas_others) / 2.0 + np.spacing(1)                    # (M,)
    e = d2 / variances[None, :] / scale[:, None] / 2.0
    return np.exp(-e).mean(axis=1)


def oks_nms(instances, sigmas=COCO.sigmas, thr=0.9):
    """Greedy non-maximum suppression by OKS, among the instances of one image.

    instances: list of dicts with 'keypoints' (K x 3 or flat 3K: x, y, score), 'score' and
    'area'. Highest score first; every instance whose OKS with a kept one exceeds thr is
    dropped. As in the HRNet code's oks_nms, the OKS of a pair uses the mean of the two areas
    and all K keypoints. Returns the kept indices into ``instances``, best first.
    """
    if not instances:
        return []
    sigmas = np.asarray(sigmas, np.float64)
    variances = (2 * sigmas) ** 2
    kpts = np.stack([_keypoints_array(inst['keypoints'], len(sigmas)) for inst in instances])
    scores = np.array([float(inst['score']) for inst in instances])
    areas = np.array([float(inst['area']) for inst in instances])
    order = np.argsort(-scores, kind='stable')
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        if rest.size == 0:
            break
        oks = _oks_one_to_many(kpts[i], kpts[rest], areas[i], areas[rest], variances)
        order = rest[oks <= thr]
    return keep


def _load_coco_gt(gt_json_path):
    data = load_json(gt_json_path)
    if not isinstance(data, dict) or not all(k in data for k in ('images', 'annotations',
                                                                 'categories')):
        raise _fail(gt_json_path, "not a COCO annotation file (needs 'images', 'annotations', "
                                  "'categories')")
    from pycocotools.coco import COCO as CocoApi
    with contextlib.redirect_stdout(io.StringIO()):
        gt = CocoApi()
        gt.dataset = data
        gt.createIndex()
    return gt


def coco_oks_ap(results, gt_json_path, joint_set=COCO, in_vis_thre=0.2, oks_thre=0.9,
                verbose=False):
    """COCO keypoint AP, with the HRNet / SimpleBaselines post-processing.

    results: list of {'image_id', 'keypoints' (K x 3 or flat 3K: x, y, score; 0-based image
    pixels as COCO), 'box_score', 'area' (the person box area used by OKS-NMS), optional
    'category_id' (default 1)}.
    Each instance is rescored as box_score * mean of its keypoint scores above in_vis_thre
    (box_score alone when none is), then OKS-NMS at oks_thre runs per image, then pycocotools'
    COCOeval(iouType='keypoints') with the joint set's sigmas.
    Returns {'AP', 'AP .5', 'AP .75', 'AP (M)', 'AP (L)', 'AR', 'AR .5', 'AR .75', 'AR (M)',
    'AR (L)'} as fractions 0..1. pycocotools' prints are silenced unless verbose.
    """
    gt = _load_coco_gt(gt_json_path)
    k = joint_set.num_joints
    sigmas = np.asarray(joint_set.sigmas if joint_set.sigmas is not None else COCO.sigmas)
    per_image = {}
    for n, r in enumerate(results):
        image_id, category, kpts = _result(r, n, k)
        box_score = _finite(r, 'box_score', n, _finite(r, 'score', n, 1.0))
        good = kpts[:, 2] > in_vis_thre
        score = box_score * float(kpts[good, 2].mean()) if good.any() else box_score
        # no box area given: the extent of the keypoints
        area = _finite(r, 'area', n, float(np.ptp(kpts[:, 0]) * np.ptp(kpts[:, 1])))
        per_image.setdefault(image_id, []).append(dict(
            image_id=image_id, category_id=category, keypoints=kpts, score=score, area=area))
    dets = []
    for insts in per_image.values():
        for i in oks_nms(insts, sigmas, oks_thre):
            dets.append(insts[i])
    return _cocoeval(dets, gt, gt_json_path, sigmas, verbose)


def coco_keypoint_ap(results, gt_json_path, joint_set=COCO, verbose=False):
    """COCO keypoint AP of whole-image (bottom-up) results as they are: no rescoring, no NMS (as
    HigherHRNet evaluates). results: list of {'image_id', 'keypoints' (K x 3 or flat 3K), 'score',
    optional 'category_id'}. Returns the ``coco_oks_ap`` columns."""
    gt = _load_coco_gt(gt_json_path)
    sigmas = np.asarray(joint_set.sigmas if joint_set.sigmas is not None else COCO.sigmas)
    dets = []
    for n, r in enumerate(results):
        image_id, category, kpts = _result(r, n, joint_set.num_joints)
        if 'score' not in r:
            raise DatasetError(f'result {n}: malformed (no score)')
        dets.append(dict(image_id=image_id, category_id=category, keypoints=kpts, score=_finite(r, 'score', n)))
    return _cocoeval(dets, gt, gt_json_path, sigmas, verbose)


def _finite(r, key, n, default=None):
    """r[key] as a finite float (``default`` when absent); else a one-line DatasetError."""
    v = r.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating)) or not math.isfinite(v):
        raise DatasetError(f'result {n}: malformed ({key} must be a finite number, got {v!r})'[:200])
    return float(v)


def _result(r, n, k):
    """One result's image_id, category_id and keypoints (K, 3), checked."""
    if not isinstance(r, dict) or not isinstance(r.get('image_id'), (int, str)) or isinstance(r.get('image_id'), bool):
        raise DatasetError(f'result {n}: malformed (needs an object with image_id and keypoints)')
    try:
        kpts = _keypoints_array(r['keypoints'], k)
    except (KeyError, ValueError, TypeError) as exc:
        raise DatasetError(f'result {n}: malformed ({type(exc).__name__}: {exc})'[:200]) from None
    if not np.all(np.isfinite(kpts)):
        raise DatasetError(f'result {n}: malformed (keypoints must be finite numbers)')
    category = _finite(r, 'category_id', n, 1)
    return r['image_id'], int(category), kpts


def _cocoeval(dets, gt, gt_json_path, sigmas, verbose):
    """pycocotools' COCOeval(iouType='keypoints') of detections {image_id, category_id, keypoints
    (K, 3), score} against the loaded ground truth -> the COCO_STATS columns (fractions 0..1)."""
    from pycocotools.cocoeval import COCOeval
    if not dets:
        raise DatasetError('no keypoint results to evaluate')
    unknown = {d['image_id'] for d in dets} - set(gt.getImgIds())
    if unknown:
        raise DatasetError(f'{gt_json_path}: results name image ids not in the annotations, '
                           f'e.g. {sorted(unknown, key=str)[0]!r}')
    dets = [dict(image_id=d['image_id'], category_id=d['category_id'],
                 keypoints=[float(v) for v in np.asarray(d['keypoints']).reshape(-1)], score=float(d['score']))
            for d in dets]
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iouType='keypoints')
        ev.params.kpt_oks_sigmas = sigmas
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: float(v) for name, v in zip(COCO_STATS, ev.stats)}


# ---------------------------------------------------------------------------------------------
# Text tables
# ---------------------------------------------------------------------------------------------

def _fmt(v, decimals):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return 'nan'
    if isinstance(v, (int, float, np.floating, np.integer)):
        return f'{float(v):.{decimals}f}'
    return str(v)


def format_table(table, title=None, decimals=None):
    """Fixed-width text of a metric table's scalar columns (header row, then value row).

    'per_joint' (and any other non-scalar entry) is skipped. decimals defaults to 3 for a COCO
    table (fractions, it has an 'AP' column) and 2 otherwise (percentages).
    """
    if decimals is None:
        decimals = 3 if 'AP' in table else 2
    cols = [(k, v) for k, v in table.items() if not isinstance(v, (dict, list, tuple))]
    cells = [(str(k), _fmt(v, decimals)) for k, v in cols]
    widths = [max(len(h), len(c)) for h, c in cells]
    head = ' | '.join(h.rjust(w) for (h, _), w in zip(cells, widths))
    vals = ' | '.join(c.rjust(w) for (_, c), w in zip(cells, widths))
    lines = ([title] if title else []) + [head, '-' * len(head), vals]
    return '\n'.join(lines)


def format_per_joint(table, decimals=2):
    """One line per joint of table['per_joint'] ('name  value'); '' if the table has none."""
    per = table.get('per_joint') or {}
    if not per:
        return ''
    w = max(len(n) for n in per)
    return '\n'.join(f'{n.ljust(w)}  {_fmt(v, decimals).rjust(7)}' for n, v in per.items())


def topk_accuracy(topk, labels, k):
    """Top-k classification accuracy, in percent.

    topk: (N, >= k) int, each row the predicted class indices best first; labels: (N,) int, the
    true classes. Returns 100 x the fraction of rows whose first ``k`` predictions hold the label
    (a float). Wrong shapes, k outside [1, topk.shape[1]] or N = 0 are a ValueError.
    """
    topk = np.asarray(topk)
    labels = np.asarray(labels)
    if topk.ndim != 2 or labels.shape != (topk.shape[0],):
        raise ValueError(f'topk_accuracy: topk {topk.shape} must be (N, k) and labels {labels.shape} (N,)')
    if not 1 <= k <= topk.shape[1]:
        raise ValueError(f'topk_accuracy: k {k} is outside [1, {topk.shape[1]}]')
    if len(labels) == 0:
        raise ValueError('topk_accuracy: no samples')
    hits = (topk[:, :k] == labels[:, None]).any(axis=1)
    return float(hits.mean() * 100.0)
