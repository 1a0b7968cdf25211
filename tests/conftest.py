"""Shared fixtures. Data from ../shared is optional: tests needing it skip with a reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CALIBCLIP_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CALIBCLIP_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with a clear reason when it is missing."""
    path = SHARED.joinpath("data", *parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the read-only ../shared data beside the checkout; present in CI)")
    return path


@pytest.fixture
def color_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Register `fakes.ColorEncoder` as model ``color-test`` and point the feature cache into tmp."""
    from fakes import ColorEncoder, register_fake_model

    monkeypatch.setenv("CALIBCLIP_CACHE", str(tmp_path / "cache"))
    return register_fake_model(monkeypatch, "color-test", ColorEncoder)


@pytest.fixture(scope="session")
def flickr8k_root() -> Path:
    return shared_path("flickr8k")


@pytest.fixture(scope="session")
def cirr_root() -> Path:
    return shared_path("cirr")


@pytest.fixture(scope="session")
def fashioniq_root() -> Path:
    return shared_path("fashioniq")
