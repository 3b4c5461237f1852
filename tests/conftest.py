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


@pytest.fixture
def one_thread():
    """torch on one thread for the test (small models run faster so on the 2-core machines), the
    previous count restored after it; modules opt in with ``pytestmark = pytest.mark.usefixtures('one_thread')``."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
