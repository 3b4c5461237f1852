"""Look Into Person (LIP) single-person pose reader: 16 joints in the MPII order, PCKh@0.5.

Layout under ``dataDir`` (the LIP download; see README, Preparing datasets)::

    TrainVal_pose_annotations/lip_train_set.csv, lip_val_set.csv
    TrainVal_images/train_images/*.jpg, TrainVal_images/val_images/*.jpg   (or train_images/, val_images/)

Also accepted for the annotations: ``lip_{train,val}_set.csv`` or ``lip_{train,val}_annotations.csv``
directly under dataDir or under ``annotations/``.

Each csv row (no header): ``ImageID_PersonID.jpg`` then 16 x (x, y, occluded); ``nan`` marks a
joint that is not labelled (visible 0). LIP's images are already single-person crops, stored
under exactly the name of the first column.

Conventions:
  * The coordinates are 1-based pixels: over the 10,000 validation rows no coordinate is 0 while
    469 x values are exactly 1 (joints clamped to the left border). Records are 0-based (- 1);
    ``save_predictions`` writes the csv in the file's frame (+ 1).
  * Box: the square around the labelled joints, 1.25 x the longer side of their extent (as LSP,
    ``datasets.base.box_from_joints``). A row with no labelled joint is skipped.
  * ``nan`` is LIP's own mark of an unlabelled joint: such a joint is read as unlabelled (visible 0),
    never as an error.
"""
import os

import numpy as np

from datasets import register_dataset
from datasets.base import Reader, box_from_joints, check_data_dir, first_existing, sample_limit
from datasets.formats import read_lip_csv
from datasets.joints import MPII
from utils.errors import DatasetError


def annotation_candidates(root, split):
    return [os.path.join(root, 'TrainVal_pose_annotations', f'lip_{split}_set.csv'),
            os.path.join(root, f'lip_{split}_set.csv'),
            os.path.join(root, f'lip_{split}_annotations.csv'),
            os.path.join(root, 'annotations', f'lip_{split}_annotations.csv'),
            os.path.join(root, 'annotations', f'lip_{split}_set.csv')]


def image_candidates(root, split):
    return [os.path.join(root, 'TrainVal_images', f'{split}_images'),
            os.path.join(root, 'TrainVal_images', 'TrainVal_images', f'{split}_images'),
            os.path.join(root, f'{split}_images')]


@register_dataset('LIP')
class LIPReader(Reader):
    joint_set = MPII

    def __init__(self, opts, split):
        super().__init__(opts, split)
        root = opts.dataDir
        check_data_dir('LIP', root)
        path = first_existing(annotation_candidates(root, split))
        if path is None:
            raise DatasetError(f'LIP: expected TrainVal_pose_annotations/lip_{split}_set.csv (or '
                               f'lip_{split}_annotations.csv, directly or in annotations/) under {root} '
                               f'(see README, Preparing datasets)')
        image_dir = first_existing(image_candidates(root, split), 'dir')
        if image_dir is None:
            raise DatasetError(f'LIP: expected the images in TrainVal_images/{split}_images/ or '
                               f'{split}_images/ under {root} (see README, Preparing datasets)')
        self.annotation_path = path
        try:
            names, joints, labelled, occluded = read_lip_csv(path, with_flags=True)
        except DatasetError as exc:
            raise DatasetError(f'LIP: {exc}') from None
        limit = sample_limit(opts, split)
        for i, name in enumerate(names):
            if limit and len(self.records) >= limit:
                break
            vis = labelled[i].astype(np.float32)
            j = np.where(vis[:, None] > 0, np.nan_to_num(joints[i]) - 1.0, 0.0)   # 1-based -> 0-based
            center, scale = box_from_joints(j, vis)
            if center is None:
                continue
            self.add(f'LIP: {path}: row {i + 1}', image=os.path.join(image_dir, name), name=name,
                     center=center, scale=scale, keypoints=j, visible=vis,
                     occluded=occluded[i].astype(np.float32)[None])

    def evaluate(self, preds, scores, indices):
        """LIP PCKh@0.5 (head size ||head top - upper neck||); headline = Mean."""
        from utils import metrics
        recs = [self.records[int(i)] for i in indices]
        gt = np.stack([r['keypoints'][0] for r in recs]).astype(np.float64)
        vis = np.stack([r['visible'][0] for r in recs])
        gt[vis == 0] = np.nan
        table = metrics.lip_pckh_table(np.asarray(preds, np.float64), gt, vis)
        return table, table['Mean']

    def save_predictions(self, preds, scores, indices, out_dir):
        """pred.csv in the annotation layout (name, 16 x (x, y)), 1-based as the annotations."""
        from datasets.formats import write_lip_csv
        order = np.argsort(np.asarray(indices), kind='stable')
        idx = np.asarray(indices)[order]
        path = os.path.join(out_dir, 'pred.csv')
        write_lip_csv(path, [self.records[int(i)]['name'] for i in idx],
                              np.asarray(preds, np.float64)[order] + 1.0)
        return path
