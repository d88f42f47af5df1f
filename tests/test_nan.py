"""A non-finite loss stops the run with the step and the last good checkpoint, which stays loadable."""
from core import checkpoint
from core.model import build_model
from core.recipe import load_recipe
from tests.helpers import GRID_RECIPE

POISON = '''
import torch
from core import hookimpl


class Poison:
    """Adds NaN to the loss from step ``at`` on (counting its own calls)."""

    def __init__(self, at=3):
        self.at, self.calls = at, 0

    @hookimpl
    def vlmkit_regulariser_loss(self, model, batch, outputs):
        self.calls += 1
        return {"poison": torch.tensor(float("nan") if self.calls > self.at else 0.0)}


@hookimpl
def vlmkit_register(registry):
    registry.add("regulariser", "poison", Poison)
'''


def test_nan_loss_names_the_step_and_keeps_the_last_checkpoint(cli, tmp_path, registry):
    (tmp_path / "poison_plugin.py").write_text(POISON)
    run_dir = tmp_path / "run"
    result = cli("core.run", GRID_RECIPE, f"run.dir={run_dir}", f"data.dataset.cache_dir={tmp_path / 'cache'}",
                 f"plugins=[{tmp_path / 'poison_plugin.py'}]", "stages.0.regularisers=[{name: poison, at: 3}]",
                 "stages.0.checkpoint_every=2", "stages.0.steps=10", "data.batch_size=4",
                 "data.dataset.train_samples=128", "data.dataset.eval_samples=8", "eval.samples=8",
                 "stages.0.probe_every=0", "stages.0.monitor_every=0")
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: stage vis_tok step 3: loss is nan") and "poison=nan" in message
    good = run_dir / "vis_tok" / "model_000002.safetensors"
    assert message.endswith(f"last good checkpoint: {good}")
    assert checkpoint.latest(str(run_dir / "vis_tok")) == str(good)
    model, _ = build_model(load_recipe(GRID_RECIPE).model, registry)
    assert checkpoint.load_parts(model, str(good), list(checkpoint.PARTS))  # whole and loadable
