"""Drawing skeletons on images: limbs coloured by side (left blue, right orange, centre green),
joints as dots, optional joint names; predictions solid, ground truth thin."""
import cv2
import numpy as np

from datasets.pipeline import denormalize

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


def save_prediction_grid(path, images, preds, gts, visibles, joint_set, size=256, cols=4):
    """Write a PNG grid: each normalised crop tensor with its predicted skeleton (thick) over the
    ground truth (thin, white). preds/gts in crop pixels (K, 2)."""
    tiles = []
    for img, pred, gt, vis in zip(images, preds, gts, visibles):
        rgb = denormalize(img)
        f = size / rgb.shape[1]
        rgb = cv2.resize(rgb, (size, int(round(rgb.shape[0] * f))), interpolation=cv2.INTER_LINEAR)
        # crop pixel centre x maps to (x + 0.5) * f - 0.5 in the resized image
        to_tile = lambda p: (np.asarray(p) + 0.5) * f - 0.5
        white = {k: (255, 255, 255) for k in SIDE_COLOURS}
        rgb = draw_skeleton(rgb, to_tile(gt), vis, joint_set, thickness=1, radius=2, colours=white)
        rgb = draw_skeleton(rgb, to_tile(pred), np.ones(len(pred)), joint_set, thickness=2, radius=3)
        tiles.append(rgb)
    if not tiles:
        return None
    rows = []
    for r in range(0, len(tiles), cols):
        row = tiles[r:r + cols]
        row += [np.zeros_like(tiles[0])] * (cols - len(row))
        rows.append(np.concatenate(row, axis=1))
    grid = np.concatenate(rows, axis=0)
    cv2.imwrite(path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return path
