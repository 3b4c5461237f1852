"""Joint sets as data: names, flip pairs, skeletons and (for COCO) OKS sigmas.

Every reader points at one of these; nothing else in the project hard-codes a joint index.
"""
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class JointSet:
    """Metadata of one keypoint layout.

    names: K joint names, in the dataset's order.
    flip_pairs: (left/right) index pairs swapped by a horizontal flip.
    skeleton: limbs as (a, b) index pairs, for drawing.
    sigmas: (K,) per-keypoint OKS sigmas (COCO only).
    head: indices (upper neck, head top) that define the PCKh head segment, when present.
    upper_body: indices of the upper body (HRNet's ``upper_body_ids``), for the half-body
    augmentation; the other joints are the lower body.
    """
    name: str
    names: Tuple[str, ...]
    flip_pairs: Tuple[Tuple[int, int], ...]
    skeleton: Tuple[Tuple[int, int], ...]
    sigmas: Optional[Tuple[float, ...]] = None
    head: Optional[Tuple[int, int]] = None
    upper_body: Tuple[int, ...] = ()

    @property
    def num_joints(self) -> int:
        return len(self.names)

    def flip_permutation(self) -> np.ndarray:
        """(K,) index array: joint i of the flipped image is joint perm[i] of the original."""
        perm = np.arange(self.num_joints)
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm

    def side(self, index: int) -> str:
        """'L', 'R' or 'C' (centre) from the joint's name."""
        n = self.names[index].lower()
        if n.startswith(('l_', 'left')):
            return 'L'
        if n.startswith(('r_', 'right')):
            return 'R'
        return 'C'

    def index(self, name: str) -> int:
        return self.names.index(name)


MPII = JointSet(
    name='MPII',
    names=('r_ankle', 'r_knee', 'r_hip', 'l_hip', 'l_knee', 'l_ankle', 'pelvis', 'thorax',
           'upper_neck', 'head_top', 'r_wrist', 'r_elbow', 'r_shoulder', 'l_shoulder',
           'l_elbow', 'l_wrist'),
    flip_pairs=((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13)),
    skeleton=((0, 1), (1, 2), (2, 6), (3, 6), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9),
              (10, 11), (11, 12), (12, 7), (7, 13), (13, 14), (14, 15)),
    head=(8, 9),
    upper_body=(7, 8, 9, 10, 11, 12, 13, 14, 15),
)

# LSP order: R-ankle, R-knee, R-hip, L-hip, L-knee, L-ankle, R-wrist, R-elbow, R-shoulder,
# L-shoulder, L-elbow, L-wrist, neck, head top.
LSP = JointSet(
    name='LSP',
    names=('r_ankle', 'r_knee', 'r_hip', 'l_hip', 'l_knee', 'l_ankle', 'r_wrist', 'r_elbow',
           'r_shoulder', 'l_shoulder', 'l_elbow', 'l_wrist', 'neck', 'head_top'),
    flip_pairs=((0, 5), (1, 4), (2, 3), (6, 11), (7, 10), (8, 9)),
    skeleton=((0, 1), (1, 2), (3, 4), (4, 5), (2, 8), (3, 9), (6, 7), (7, 8), (8, 12),
              (9, 12), (9, 10), (10, 11), (12, 13)),
    head=(12, 13),
    upper_body=(6, 7, 8, 9, 10, 11, 12, 13),
)

COCO = JointSet(
    name='COCO',
    names=('nose', 'l_eye', 'r_eye', 'l_ear', 'r_ear', 'l_shoulder', 'r_shoulder', 'l_elbow',
           'r_elbow', 'l_wrist', 'r_wrist', 'l_hip', 'r_hip', 'l_knee', 'r_knee', 'l_ankle',
           'r_ankle'),
    flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)),
    skeleton=((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6),
              (5, 7), (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4),
              (3, 5), (4, 6)),
    sigmas=(.026, .025, .025, .035, .035, .079, .079, .072, .072, .062, .062, .107, .107,
            .087, .087, .089, .089),
    upper_body=tuple(range(11)),
)

JOINT_SETS = {js.name: js for js in (MPII, LSP, COCO)}


def generic(num_joints: int) -> JointSet:
    """A joint set with no names, for models built without a dataset (e.g. -summary)."""
    return JointSet(name=f'K{num_joints}', names=tuple(f'j{i}' for i in range(num_joints)),
                    flip_pairs=(), skeleton=())
