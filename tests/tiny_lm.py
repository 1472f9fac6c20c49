"""The tiny-data fixture (skcgolf.tinydata) for the trainer, export and evaluation tests."""
import os
from pathlib import Path

import pytest

import train_gpt
from skcgolf.tinydata import TinyData

REPO_ROOT_FOR_TESTS = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> TinyData:
    return TinyData(tmp_path_factory.mktemp("tiny_lm"))


def subprocess_env(config: dict[str, str]) -> dict[str, str]:
    """The current environment without any skc-golf setting, plus `config`, single-threaded."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith(train_gpt.ENV_PREFIXES) or k.endswith(train_gpt.ENV_SUFFIXES) or k in train_gpt.Hyperparameters.SETTINGS)}
    env.update(config, OMP_NUM_THREADS="1")
    return env
