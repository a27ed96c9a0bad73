import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # the repo, for generate.py runs

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped with the reason when none is present)")
    config.addinivalue_line("markers", "slow: a few seconds or more")
