"""Chart test fixtures: scripts/chart_check.py (the CI check, reused here) and rendered releases."""
from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))

import chart_check  # noqa: E402
from chart_release import Release  # noqa: E402

MULTI_REGION = chart_check.EXAMPLES / "multi-region"


@pytest.fixture(scope="session")
def default_release() -> Release:
    return Release.render({})


@pytest.fixture(scope="session")
def us_east() -> Release:
    return Release.render(chart_check.load_values(MULTI_REGION / "us-east.yaml"))


@pytest.fixture(scope="session")
def eu_west() -> Release:
    return Release.render(chart_check.load_values(MULTI_REGION / "eu-west.yaml"))
