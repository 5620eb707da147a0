"""Shared pytest fixtures. `shared_dir` is the project's ../shared folder (reference fixtures and
the CamVid data); tests that need it skip with a reason on a user's clone, where it is absent."""

from pathlib import Path

import pytest

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
