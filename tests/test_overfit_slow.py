"""Slow real-data check (pytest -m slow): a small hourglass overfits the 5 real MPII fixture
images to >= 95 PCKh@0.5, scored in original image pixels with the official head sizes."""
import os
import sys

import pytest

from conftest import ROOT, fixture_path

sys.path.insert(0, os.path.join(ROOT, 'bench'))


@pytest.mark.slow
def test_small_hourglass_overfits_real_mpii_images(tmp_path):
    fixtures = os.path.dirname(os.path.dirname(fixture_path('mpii', 'mpii_val5.json')))
    from overfit_mpii import overfit
    table, seconds = overfit(fixtures, epochs=300, exp_dir=str(tmp_path))
    assert table['Mean'] >= 95.0, table
