from __future__ import annotations

import pytest

from keyart.config import Settings
from keyart.lake import Lake


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(tmp_path / "lake")


@pytest.fixture
def settings():
    return Settings()
