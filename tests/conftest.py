"""Fixtures shared by the test modules (plain helpers are in tests/helpers.py)."""
import importlib
import os
import subprocess

import pytest

from core.registry import load_plugins
from tests.helpers import run_cli

# No test may reach a model hub: a hub name resolves from the cache or fails at once (core/hub.py).
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def registry():
    """Every built-in component, loaded once."""
    return load_plugins()[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The cache folder of tests/tiny_recipe.py's synthetic data: rendered by the first run, reused after."""
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture
def cli(capsys):
    """Run ``python -m MODULE ARGS`` in this process (no interpreter start-up): a CompletedProcess with the
    exit code ``main`` returns and what it printed. ``env_extra`` (a PYTHONPATH for a plugin, say) needs a
    real process, and so do kills and torchrun: those use ``tests.helpers.run_cli``."""
    def run(module, *args, env_extra=None, **kwargs):
        if env_extra:
            return run_cli(module, *args, env_extra=env_extra, **kwargs)
        main = importlib.import_module(module if module != "benchmarks" else "benchmarks.__main__").main
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([module, *args], code, out, err)
    return run
