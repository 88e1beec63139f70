"""Helpers the tests import by name (tests/ is on sys.path, see conftest.py): what is missing here is skipped,
and failed in CI, where scripts/setup.sh installs everything."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    """Whether the tests run in CI (CI=true there): what a newcomer's machine lacks must fail, not skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(message: str, module_level: bool = False) -> None:
    """Skip the test (or, with ``module_level``, the whole module) for something this machine lacks; in CI,
    fail with ``message`` (which says how to install it)."""
    if in_ci():
        pytest.fail(f"{message}\nIn CI this is a failure, not a skip: scripts/setup.sh installs it.", pytrace=False)
    pytest.skip(message, allow_module_level=module_level)
