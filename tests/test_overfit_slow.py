"""Slow real-data checks (pytest -m slow): small models overfit the real fixture images, scored
in original image pixels through the official evaluations (MPII's head sizes of gt_valid.mat,
COCO's OKS AP through pycocotools)."""
import os
import sys

import pytest

from conftest import ROOT, fixture_path

sys.path.insert(0, os.path.join(ROOT, 'bench'))


def fixtures():
    return os.path.dirname(os.path.dirname(fixture_path('mpii', 'mpii_val5.json')))


@pytest.mark.slow
def test_small_hourglass_overfits_real_mpii_images(tmp_path):
    from overfit import overfit
    table, seconds = overfit(fixtures(), 'mpii', 'StackedHourGlass', epochs=300, exp_dir=str(tmp_path))
    assert table['Mean'] >= 95.0, table


@pytest.mark.slow
def test_small_higherhrnet_overfits_real_coco_images(tmp_path):
    """Bottom-up, whole images, grouping by tags, pycocotools: about 30 minutes on 2 cores."""
    from overfit import overfit
    table, seconds = overfit(fixtures(), 'coco', 'HigherHRNet', epochs=600, exp_dir=str(tmp_path))
    assert table['AP'] >= 0.9, table
