"""Fixtures shared by the test modules (plain helpers are in tests/helpers.py)."""
import pytest

from core.registry import load_plugins
from tests.helpers import run_cli


@pytest.fixture(scope="session")
def registry():
    """Every built-in component, loaded once."""
    return load_plugins()[1]


@pytest.fixture
def cli():
    return run_cli
