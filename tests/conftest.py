import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(os.path.dirname(ROOT), 'shared', 'fixtures')


def fixture_path(*parts):
    """Path under ../shared/fixtures; skips the test with a reason when it is absent."""
    path = os.path.join(FIXTURES, *parts)
    if not os.path.exists(path):
        pytest.skip(f'real-data fixture not found: {path} (it lives in ../shared/fixtures beside the repository)')
    return path
