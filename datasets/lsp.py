"""Leeds Sports Pose (LSP) and LSP-extended readers: 14 joints, PCK@0.2 (torso).

Layout under ``dataDir`` (see README, Preparing datasets)::

    joints.mat            LSP, key 'joints' (3, 14, 2000): rows x, y, flag; flag 0 = visible
    images/im0001.jpg ... im2000.jpg
    lspet/joints.mat      optional LSP-extended, key 'joints' (14, 3, 10000): flag 1 = visible
    lspet/images/im00001.jpg ... im10000.jpg

Splits (the standard protocol): train = LSP images 1-1000 (+ all of LSP-extended when present),
val = LSP images 1001-2000.

Conventions:
  * The .mat coordinates are MATLAB pixels (1-based). Records are 0-based (x - 1, y - 1);
    ``save_predictions`` adds the 1 back, so pred.mat is in the frame of joints.mat.
  * LSP labels all 14 joints of every person, occluded ones with an estimated position, and
    the standard evaluation scores all of them: an LSP record's ``visible`` is 1 for every joint
    and the flag is kept as ``occluded``. LSP-extended (Amazon Mechanical Turk labels) gives no
    usable position for a joint flagged invisible: there ``visible`` is the flag.
  * No person box is given: the box is the square around the labelled joints' extent, centred on
    the extent's middle, of side ``BOX_MARGIN`` (1.25) x the longer side of the extent (the same
    1.25 padding that MPII and COCO boxes get); ``scale = side / 200``.
"""
import os

import numpy as np

from datasets import register_dataset
from datasets.base import Reader, box_from_joints, check_data_dir, sample_limit
from datasets.formats import read_lsp_joints
from datasets.joints import LSP
from utils.errors import DatasetError


def _load_layout(path):
    """-> joints (N, 14, 2) 1-based as stored, visible-by-flag (N, 14), layout 'lsp' or 'lspet'."""
    try:
        return read_lsp_joints(path)
    except DatasetError as exc:
        raise DatasetError(f'LSP: {exc}') from None


@register_dataset('LSP')
class LSPReader(Reader):
    joint_set = LSP
    pred_offset = 1.0  # pred.mat in the 1-based frame of the official files

    def __init__(self, opts, split):
        super().__init__(opts, split)
        root = opts.dataDir
        check_data_dir('LSP', root)
        lsp_mat = os.path.join(root, 'joints.mat')
        lspet_mat = os.path.join(root, 'lspet', 'joints.mat')
        use_lspet = split == 'train' and os.path.isfile(lspet_mat)
        if not os.path.isfile(lsp_mat) and not use_lspet:
            extra = ' (and/or lspet/joints.mat)' if split == 'train' else ''
            raise DatasetError(f'LSP: expected joints.mat{extra} under {root} '
                               f'(see README, Preparing datasets)')
        sources = []
        if os.path.isfile(lsp_mat):
            joints, flags, layout = _load_layout(lsp_mat)
            if layout != 'lsp' or len(joints) != 2000:
                raise DatasetError(f'LSP: {lsp_mat}: expected the LSP layout 3x14x2000 '
                                   f'(flag 0 = visible), found {len(joints)} persons in the '
                                   f'{"LSP" if layout == "lsp" else "LSP-extended 14x3xN"} layout; '
                                   f'put LSP-extended at lspet/joints.mat')
            rows = range(0, 1000) if split == 'train' else range(1000, 2000)
            sources.append(('lsp', lsp_mat, joints, flags, rows,
                            os.path.join(root, 'images'), 'im%04d.jpg'))
        if use_lspet:
            joints, flags, layout = _load_layout(lspet_mat)
            if layout != 'lspet':
                raise DatasetError(f'LSP: {lspet_mat}: expected the LSP-extended layout 14x3xN '
                                   f'(flag 1 = visible), found the LSP layout 3x14xN')
            sources.append(('lspet', lspet_mat, joints, flags, range(len(joints)),
                            os.path.join(root, 'lspet', 'images'), 'im%05d.jpg'))
        limit = sample_limit(opts, split)
        for layout, mat_path, joints, flags, rows, image_dir, pattern in sources:
            if not os.path.isdir(image_dir):
                raise DatasetError(f'LSP: expected the images of {mat_path} in {image_dir} '
                                   f'(see README, Preparing datasets)')
            for i in rows:
                if limit and len(self.records) >= limit:
                    break
                j = joints[i] - 1.0                                   # MATLAB 1-based -> 0-based
                finite = np.all(np.isfinite(j), axis=1)
                if layout == 'lsp':
                    vis = finite.astype(np.float32)
                else:
                    vis = ((flags[i] > 0) & finite).astype(np.float32)
                center, scale = box_from_joints(j, vis)
                if center is None:           # LSP-extended person with no visible joint
                    continue
                self.add(f'LSP: {mat_path}: person {i + 1}', image=os.path.join(image_dir, pattern % (i + 1)),
                         center=center, scale=scale, keypoints=np.where(vis[:, None] > 0, j, 0.0), visible=vis,
                         occluded=((flags[i] == 0) & finite).astype(np.float32)[None],
                         source=layout, index_in_file=i)

    def evaluate(self, preds, scores, indices):
        """PCK@0.2 with the torso diameter over the given records; headline = Mean."""
        from utils import metrics
        recs = [self.records[int(i)] for i in indices]
        gt = np.stack([r['keypoints'][0] for r in recs])
        vis = np.stack([r['visible'][0] for r in recs])
        table = metrics.lsp_pck_table(np.asarray(preds, np.float64), gt, vis)
        return table, table['Mean']

