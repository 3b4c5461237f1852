"""Drawing skeletons on images: limbs coloured by side (left blue, right orange, centre green),
joints as dots, optional joint names; predictions solid, ground truth thin."""
import cv2
import numpy as np

from datasets.pipeline import denormalize
from utils.io import atomic_write

SIDE_COLOURS = {'L': (40, 120, 255), 'R': (255, 140, 0), 'C': (40, 200, 80)}  # RGB


def limb_side(joint_set, a, b):
    sides = {joint_set.side(a), joint_set.side(b)}
    if sides == {'L'} or sides == {'L', 'C'}:
        return 'L'
    if sides == {'R'} or sides == {'R', 'C'}:
        return 'R'
    return 'C'


def draw_skeleton(image, joints, visible, joint_set, thickness=2, radius=3, names=False, colours=None):
    """Draw one person on a copy of ``image`` (uint8 RGB (H, W, 3)).

    joints (K, 2) pixels, visible (K,) (joints with 0 are skipped); limbs from
    ``joint_set.skeleton``; left and right limbs get different colours.
    """
    out = np.ascontiguousarray(image.copy())
    colours = colours or SIDE_COLOURS
    vis = np.asarray(visible) > 0
    pts = np.round(np.asarray(joints, np.float64) * 16).astype(np.int32)  # 4 fractional bits
    for a, b in joint_set.skeleton:
        if vis[a] and vis[b]:
            cv2.line(out, tuple(int(v) for v in pts[a]), tuple(int(v) for v in pts[b]),
                     colours[limb_side(joint_set, a, b)], thickness, cv2.LINE_AA, shift=4)
    for k in np.flatnonzero(vis):
        c = colours[joint_set.side(int(k))]
        cv2.circle(out, tuple(int(v) for v in pts[k]), radius * 16, c, -1, cv2.LINE_AA, shift=4)
        if names:
            x, y = (pts[k] / 16).astype(int)
            cv2.putText(out, joint_set.names[k], (int(x) + 3, int(y) - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.3,
                        (255, 255, 255), 1, cv2.LINE_AA)
    return out


def save_prediction_grid(path, images, preds, gts, visibles, joint_set, size=256, cols=4, pred_visibles=None):
    """Write a PNG grid: each normalised crop tensor with its predicted people (thick) over the
    ground truth (thin, white). Per tile: preds (N, K, 2) and gts (M, K, 2) in crop pixels (one
    person may be given as (K, 2)), visibles (M, K) of the ground truth, pred_visibles (N, K) of
    the predicted joints to draw (default: all)."""
    tiles = []
    white = {k: (255, 255, 255) for k in SIDE_COLOURS}
    if pred_visibles is None:
        pred_visibles = [None] * len(images)
    for img, pred, gt, vis, shown in zip(images, preds, gts, visibles, pred_visibles):
        rgb = denormalize(img)
        f = size / rgb.shape[1]
        rgb = cv2.resize(rgb, (size, int(round(rgb.shape[0] * f))), interpolation=cv2.INTER_LINEAR)
        # crop pixel centre x maps to (x + 0.5) * f - 0.5 in the resized image
        k = joint_set.num_joints
        for person, v in zip(np.reshape(gt, (-1, k, 2)), np.reshape(vis, (-1, k))):
            rgb = draw_skeleton(rgb, (person + 0.5) * f - 0.5, v, joint_set, thickness=1, radius=2, colours=white)
        pred = np.reshape(pred, (-1, k, 2))
        shown = np.ones(pred.shape[:2]) if shown is None else np.reshape(shown, (-1, k))
        for person, v in zip(pred, shown):
            rgb = draw_skeleton(rgb, (person + 0.5) * f - 0.5, v, joint_set, thickness=2, radius=3)
        tiles.append(rgb)
    if not tiles:
        return None
    height = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 0), (0, 0))) for t in tiles]
    rows = []
    for r in range(0, len(tiles), cols):
        row = tiles[r:r + cols]
        row += [np.zeros_like(tiles[0])] * (cols - len(row))
        rows.append(np.concatenate(row, axis=1))
    return write_png(path, np.concatenate(rows, axis=0))


def write_png(path, rgb):
    """Write an RGB uint8 image as a PNG through the atomic write."""
    ok, data = cv2.imencode('.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f'cannot encode {path} as PNG')
    return atomic_write(path, lambda f: f.write(data.tobytes()), binary=True)
