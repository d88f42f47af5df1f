"""--dry-run's memory estimate (core/memory.py): within 25% of the peak a real training step reaches on
the CPU (benchmarks/memory.py measures it with torch's allocator events), and what parallelism and adapters change."""
import pytest

from benchmarks.memory import measured_peak
from core import memory
from core.recipe import load_recipe
from core.registry import load_plugins
from tests.tiny_recipe import lora_recipe

pytest.importorskip("peft")  # the LoRA stages: pip install -e ".[lora]"
AC = "stages.1.activation_checkpointing=[decoder,encoder.sam]"


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory")
    return str(lora_recipe(folder, folder / "cache"))


@pytest.mark.parametrize("index, overrides", [(0, []), (1, []), (1, ["run.precision=bf16", AC])],
                         ids=["full", "lora", "lora-bf16-recompute"])
def test_the_estimate_is_within_25_percent_of_the_measured_peak(plugins, recipe_path, index, overrides):
    pm, registry = plugins
    recipe = load_recipe(recipe_path, ["data.batch_size=16", *overrides])
    estimate = memory.estimate(recipe, registry, pm, index)
    measured = measured_peak(recipe, registry, pm, index)
    assert 0.75 <= estimate.total / measured <= 1.25, (estimate, measured)
    assert estimate.activations > 0


def test_adapters_and_parallelism_change_what_they_should(plugins, recipe_path):
    pm, registry = plugins
    recipe = load_recipe(recipe_path)
    full, lora = memory.estimate(recipe, registry, pm, 0), memory.estimate(recipe, registry, pm, 1)
    assert lora.trainable < full.trainable / 10 and lora.gradients < full.gradients / 10
    assert 2 * lora.gradients <= lora.optimizer < 3 * lora.gradients  # AdamW: two moments (+ step counts)
    ddp = memory.estimate(recipe, registry, pm, 0, world_size=2)
    assert ddp.parallel_extra == full.gradients and ddp.weights == full.weights  # DDP's buckets; replicas
    fsdp = memory.estimate(load_recipe(recipe_path, ["run.parallel=fsdp"]), registry, pm, 0, world_size=4)
    assert fsdp.gradients == full.gradients // 4 and fsdp.optimizer == full.optimizer // 4
    assert fsdp.weights < full.weights / 2 and 0 < fsdp.parallel_extra < full.weights


def test_dry_run_prints_each_stages_memory(cli, recipe_path):
    result = cli("core.run", recipe_path, "--dry-run", "--world-size", "2")
    assert result.returncode == 0, result.stderr
    for title in ("stage 1/2 'a'", "stage 2/2 'b'"):
        assert f"{title}: memory of a training step per process (2 processes (ddp)" in result.stdout
    assert result.stdout.count("  total ") == 2 and "DDP's gradient buckets" in result.stdout
