"""Shared test set-up: the repository root on sys.path, and data/prepare.py as a module."""
import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tiny_lm import tiny_data  # noqa: E402,F401  (the tiny corpus/tokenizer/shards fixture, shared by all tests)


def load_prepare_module():
    spec = importlib.util.spec_from_file_location("prepare", REPO_ROOT / "data" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def prepare():
    """data/prepare.py, imported from its file (data/ is not a package)."""
    return load_prepare_module()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT

