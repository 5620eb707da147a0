"""Shared pytest fixtures. `shared_dir` is the project's ../shared folder (reference fixtures and
the CamVid data); tests that need it skip with a reason on a user's clone, where it is absent."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (reference fixtures / CamVid live only beside the dev repo)")
    return SHARED


@pytest.fixture(scope="session")
def test_data() -> Path:
    return DATA


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The whole suite runs single-threaded, restored at the end: its tensors are tiny, and on a
    shared, loaded CPU torch's thread hand-offs make such tests 10-20x slower with 2+ threads.
    (It replaces per-module settings, two of which were made at import and so already held for
    the whole session.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
