"""Plugin discovery: built-ins, a real entry point of an installed distribution, a recipe module."""
import json

import pytest

from core.errors import ConfigError
from core.registry import Registry, load_plugins
from tests.helpers import GRID_RECIPE

ENCODER_PLUGIN = '''
import torch
from core import hookimpl


class PoolEncoder(torch.nn.Module):
    """Average-pools 8x8 pixel blocks into a grid of learned features."""

    def __init__(self, image_size=64, dim=32):
        super().__init__()
        self.image_size, self.out_dim = image_size, dim
        self.proj = torch.nn.Conv2d(3, dim, kernel_size=8, stride=8)

    def grid_size(self, height, width):
        return height // 8, width // 8

    def forward(self, pixel_values):
        return self.proj(pixel_values).permute(0, 2, 3, 1)


@hookimpl
def vlmkit_register(registry):
    registry.add("encoder", "pool_encoder", PoolEncoder)
'''


def make_installed_package(root):
    """A distribution on sys.path with a dist-info folder: importlib.metadata sees a real entry point."""
    (root / "mypkg").mkdir(parents=True)
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "my_encoder.py").write_text(ENCODER_PLUGIN)
    info = root / "mypkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[vlmkit]\nmy = mypkg.my_encoder\n")
    return root


def test_builtins_are_discovered():
    _, registry = load_plugins()
    names = {(k, n) for k, n, _ in registry.listing()}
    for expected in [("encoder", "deepencoder"), ("encoder", "sam"), ("encoder", "clip"), ("decoder", "nanochat"),
                     ("projector", "linear"), ("tokenizer", "bytes"), ("dataset", "synthetic_ocr"),
                     ("metric", "fox"), ("metric", "ned"), ("regulariser", "ctc"), ("freeze", "glob"),
                     ("logger", "jsonl")]:
        assert expected in names


def test_unknown_name_lists_known_and_closest():
    _, registry = load_plugins()
    with pytest.raises(ConfigError, match=r"model.encoder: unknown encoder 'deepencodr' \(did you mean "
                                          r"'deepencoder'\?\); known: clip, deepencoder, deepseek_ocr2, sam"):
        registry.get("encoder", "deepencodr", where="model.encoder")


def test_build_rejects_unknown_argument_by_key_path():
    registry = Registry()
    registry.add("projector", "p", lambda in_dim, out_dim, bias=True: None)
    with pytest.raises(ConfigError, match=r"model.projector.bais: .* takes no argument 'bais' \(did you mean 'bias'"):
        registry.build("projector", "p", where="model.projector", in_dim=1, out_dim=2, bais=False)


def test_duplicate_registration_names_the_first_source():
    registry = Registry()
    registry.source = "built-in a"
    registry.add("metric", "m", object)
    registry.source = "recipe plugin b"
    with pytest.raises(ConfigError, match="metric 'm' is already registered by built-in a"):
        registry.add("metric", "m", object)


def test_entry_point_encoder_is_used_by_a_recipe(tmp_path, cli, monkeypatch):
    site = make_installed_package(tmp_path / "site")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe_with_encoder(GRID_RECIPE))
    short = [f"run.dir={tmp_path / 'run'}", f"data.dataset.cache_dir={tmp_path / 'cache'}", "run.threads=1",
             "stages.0.steps=2", "stages.1.steps=2", "stages.0.probe_every=0", "stages.1.probe_every=0",
             "stages.0.monitor_every=0", "stages.1.monitor_every=0", "stages.1.freeze=[]", "stages.0.regularisers=[]",
             "stages.1.regularisers=[]", "data.batch_size=4", "data.dataset.train_samples=64",
             "data.dataset.samples_per_shard=64", "data.dataset.eval_samples=4", "eval.samples=4"]
    monkeypatch.syspath_prepend(str(site))  # importlib.metadata reads sys.path: the dist-info is now installed
    _, registry = load_plugins()
    assert registry.source_of("encoder", "pool_encoder") == "entry point my (mypkg)"
    result = cli("core.run", str(recipe), *short)
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    table = {name: t + f for name, t, f in next(e for e in events if e["event"] == "stage_start")["parameters"]}
    assert table["encoder"] == 3 * 8 * 8 * 64 + 64  # the plugin's conv is the encoder that trained
    monkeypatch.undo()  # without the package on the path the same recipe names the unknown encoder
    missing = cli("core.run", str(recipe), "--dry-run")
    assert missing.returncode == 2 and "unknown encoder 'pool_encoder'" in missing.stderr


def _recipe_with_encoder(path):
    text = open(path).read()
    start = text.index("  encoder:\n")
    end = text.index("  projector:")
    return text[:start] + "  encoder: {name: pool_encoder, image_size: 32, dim: 64}\n" + text[end:]
