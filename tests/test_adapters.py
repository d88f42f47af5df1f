"""Adapters: a LoRA stage trains only its adapters, its checkpoint is the adapter and names its base,
merging gives the same logits, generate reads base + adapter, and resume, bf16 and activation checkpointing work."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from core import adapters, checkpoint, memory
from core.errors import ConfigError
from core.generate import load_checkpoint
from core.recipe import Component, load_recipe
from core.registry import load_plugins
from core.train import prepare_stage, train_step
from tests.helpers import DEFAULT_RECIPE, GRID_RECIPE, ROOT, tiny
from tests.tiny_recipe import lora_recipe, run

pytest.importorskip("peft")  # the lora adapter's library: pip install -e ".[lora]"


@pytest.fixture(scope="module")
def plugins():
    return load_plugins()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """A run: a (full), b (LoRA on all of a), c (full, its encoder from b's adapter checkpoint folder)."""
    folder = tmp_path_factory.mktemp("lora")
    after = '  - {name: c, steps: 1, lr: 3.0e-3, init_from: {path: "stage:b", parts: [encoder]}}\n'
    assert run(lora_recipe(folder, cache, after=after)) == 0
    return folder / "run"


def prepared(plugins, tmp_path, cache, *overrides):
    pm, registry = plugins
    recipe = load_recipe(str(lora_recipe(tmp_path, cache)), list(overrides))
    prep = prepare_stage(recipe, registry, pm, 1, "cpu", say=lambda text: None, init_from=False)
    with torch.no_grad():  # a base as if trained: nanochat starts with a zero head, through which no gradient flows
        generator = torch.Generator().manual_seed(1)
        for name, p in prep.model.named_parameters():
            if name not in prep.adapted.added:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    batch = memory.full_batch(recipe, prep.model, prep.tokenizer, 4)
    batch["pixel_values"].normal_(generator=torch.Generator().manual_seed(0))
    return prep, batch


@pytest.mark.parametrize("opened", [[], ["projector.*"]])
def test_a_lora_stage_trains_only_its_adapters_and_what_the_recipe_opens(plugins, tmp_path, cache, opened):
    freeze = f"stages.1.freeze=[{{name: glob, trainable: {opened}}}]"
    prep, batch = prepared(plugins, tmp_path, cache, freeze)
    params = dict(prep.model.named_parameters())
    opened_names = {n for n in params if n.startswith("projector.")} if opened else set()
    trained = set(prep.adapted.added) | opened_names
    held = {id(p) for group in prep.optimizer.param_groups for p in group["params"]}
    assert held == {id(params[n]) for n in trained}
    before = {k: v.clone() for k, v in prep.model.state_dict().items()}
    for _ in range(3):
        train_step(prep, lambda micro: batch)
    after = prep.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trained  # every base tensor bit-identical, every trained one moved
    prep.close()


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"use_rslora": True}])
def test_merged_and_unmerged_models_give_the_same_logits(plugins, variant):
    pm, registry = plugins
    model, tok = tiny(registry)
    with torch.no_grad():  # nanochat zeroes its head and output projections, which would hide the image
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.3)
    plain_keys = set(model.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[tok.bos_id] + [tok.image_id] * model.num_image_tokens() + [65, 66, 67]] * 2)
    base = model.eval()(pixels, ids)["logits"]
    frozen = adapters.frozen_by_design(model)
    model.requires_grad_(False)
    targets = ["decoder.*", "encoder.clip.*", "projector.*"]
    adapted = adapters.attach(registry, pm, model, [Component("lora", {"r": 4, "targets": targets, **variant})],
                              "adapters", frozen)
    with torch.no_grad():
        for name in adapted.added:
            dict(model.named_parameters())[name].normal_(0.0, 0.05)
    unmerged = model.eval()(pixels, ids)["logits"]
    assert (unmerged - base).abs().max() > 0.1  # the adapters change the model
    adapters.merge(pm, model, adapted)
    assert set(model.state_dict()) == plain_keys
    merged = model.eval()(pixels, ids)["logits"]
    assert (merged - unmerged).abs().max() <= 1e-5


def test_an_adapter_checkpoint_of_the_default_recipe_is_under_5_percent_of_the_full_one(plugins, tmp_path, cache):
    """Both written by a run of the default recipe's model (two steps on a few samples): vis_tok full, vis_mid
    LoRA (r 8 on the decoder's attention and CLIP) on all of vis_tok."""
    small = ["run.threads=1", "data.batch_size=2", "data.dataset.train_samples=16", "data.dataset.eval_samples=2",
             f"data.dataset.cache_dir={cache / 'lines'}", "eval=null", f"run.dir={tmp_path}", "stages.0.steps=1",
             "stages.1.steps=1", "stages.0.probe_every=0", "stages.1.probe_every=0", "stages.0.monitor_every=0",
             "stages.1.monitor_every=0", "stages.1.optimizer=adamw",
             "stages.1.init_from.parts=[encoder,projector,decoder,vision_layout]", "stages.0.model=null",
             'stages.1.adapters=[{name: lora, r: 8, alpha: 16, targets: ["decoder.*.attn.*", "encoder.clip.*"]}]']
    assert run(DEFAULT_RECIPE, *small) == 0
    full = os.path.getsize(tmp_path / "vis_tok" / "model_000001.safetensors")
    lora = os.path.getsize(tmp_path / "vis_mid" / "model_000001.safetensors")
    assert lora < 0.05 * full, (lora, full)
    assert not (tmp_path / "vis_mid" / "encoder_000001.safetensors").exists()


def test_the_adapter_checkpoint_names_its_base_and_rebuilds_on_it(plugins, trained):
    pm, registry = plugins
    path = str(trained / "b" / "model_000003.safetensors")
    meta = checkpoint.read_meta(path)
    assert meta["adapter"]["base"]["init_from"] == os.path.join("..", "a", "model_000002.safetensors")
    saved = load_file(path)
    assert saved and all(".lora_" in k for k in saved)  # the adapter alone
    model, _, adapted = adapters.rebuild(path, meta, registry, pm)
    base = load_file(str(trained / "a" / "model_000002.safetensors"))
    state = model.state_dict()
    for name, value in state.items():
        if name in adapted.added:
            assert torch.equal(value, saved[name])
        else:  # a wrapped layer's weight is base_layer.weight now
            assert torch.equal(value, base[name.replace(".base_layer.", ".")]), name


def test_generate_reads_base_plus_adapter_and_merge_writes_the_same_model(cli, trained, tmp_path):
    image = tmp_path / "page.png"
    from PIL import Image, ImageDraw
    page = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(page).text((2, 8), "ab", fill="black")
    page.save(image)
    result = cli("core.merge", trained / "b", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    texts = [cli("core.generate", folder, image, "--max-new-tokens", "6") for folder in (trained / "b",
                                                                                        tmp_path / "merged")]
    assert all(t.returncode == 0 for t in texts) and texts[0].stdout == texts[1].stdout
    unmerged, _, _ = load_checkpoint(str(trained / "b"))
    merged, tok, meta = load_checkpoint(str(tmp_path / "merged"))
    assert "adapter" not in meta and meta["merged_from"].endswith("model_000003.safetensors")
    pixels = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([[tok.bos_id] + [tok.image_id] * merged.num_image_tokens() + [65, 66]])
    assert (unmerged(pixels, ids)["logits"] - merged(pixels, ids)["logits"]).abs().max() <= 1e-5
    # stage c took its encoder from b's folder, which has no encoder file: the merged adapter checkpoint's
    merged_state = load_file(str(tmp_path / "merged" / "model_000003.safetensors"))
    c_meta = checkpoint.read_meta(str(trained / "c" / "model_000001.safetensors"))
    assert c_meta["stage"] == "c" and any(k.startswith("encoder.") for k in merged_state)


def test_init_from_an_adapter_checkpoint_loads_its_merged_weights(plugins, trained, tmp_path):
    pm, registry = plugins
    path = str(trained / "b" / "model_000003.safetensors")
    assert checkpoint.resolve(str(trained / "b"), None, ["encoder"]) == path
    model, _ = tiny(registry, seed=5)
    adapters.load_parts(model, path, list(checkpoint.PARTS), registry, pm)
    rebuilt, _, adapted = adapters.rebuild(path, checkpoint.read_meta(path), registry, pm)
    adapters.merge(pm, rebuilt, adapted)
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in model.state_dict().items())


def test_a_changed_base_is_refused_in_one_line(plugins, trained, tmp_path):
    pm, registry = plugins
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    base = copy / "a" / "model_000002.safetensors"
    tensors = load_file(str(base))
    tensors["image_newline"] = tensors["image_newline"] + 1
    from safetensors.torch import save_file
    save_file(tensors, str(base))
    path = str(copy / "b" / "model_000003.safetensors")
    with pytest.raises(ConfigError, match="has changed since the adapter was trained on it") as e:
        adapters.rebuild(path, checkpoint.read_meta(path), registry, pm)
    assert "\n" not in str(e.value)


def test_bf16_and_activation_checkpointing_train_the_adapters(plugins, tmp_path, cache):
    """Activation checkpointing recomputes the same gradients; bf16 autocast trains them too (on the CPU)."""
    runs = {}
    for name, extra in (("plain", []), ("recompute", ["stages.1.activation_checkpointing=[decoder,encoder.sam]"]),
                        ("bf16", ["run.precision=bf16"])):
        (tmp_path / name).mkdir()
        prep, batch = prepared(plugins, tmp_path / name, cache, *extra)
        for _ in range(2):
            terms = train_step(prep, lambda micro, batch=batch: batch)
        assert torch.isfinite(terms["loss"])
        runs[name] = {n: p.detach().clone() for n, p in prep.model.named_parameters() if n in prep.adapted.added}
        prep.close()
    assert all(torch.allclose(runs["plain"][k], runs["recompute"][k], atol=1e-6) for k in runs["plain"])
    assert any(not torch.equal(runs["plain"][k], runs["bf16"][k]) for k in runs["plain"])  # autocast ran


def test_bad_adapter_settings_are_one_line_errors(plugins, tmp_path, cache):
    pm, registry = plugins
    for adapter, words in (('{name: lora, targets: ["decoder.nope.*"]}', "matches no layer LoRA can adapt"),
                           ('{name: lora, r: 0, targets: ["*"]}', "r must be a whole number"),
                           ('{name: lora}', "needs targets")):
        recipe = load_recipe(str(lora_recipe(tmp_path, cache, adapter=adapter)))
        with pytest.raises(ConfigError, match=words) as e:
            prepare_stage(recipe, registry, pm, 1, "cpu", init_from=False, say=lambda text: None)
        assert "stages.1.adapters" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="stages.1.optimizer: muon orthogonalises whole weight matrices"):
        load_recipe(str(lora_recipe(tmp_path, cache)), ["stages.1.optimizer=muon"])


def test_a_lora_stage_killed_with_sigkill_and_resumed_ends_bit_identical(tmp_path, cache):
    straight = tmp_path / "straight"
    straight.mkdir()
    assert run(lora_recipe(straight, cache, steps=40, every=5)) == 0
    killed = tmp_path / "killed"
    killed.mkdir()
    recipe = lora_recipe(killed, cache, steps=40, every=5)
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "core.run", str(recipe)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    pointer = killed / "run" / "b" / "latest.json"
    deadline = time.time() + 300
    while not (pointer.exists() and json.loads(pointer.read_text())["step"] >= 10):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(pointer.read_text())["step"]
    assert done < 40, f"killed too late (step {done})"
    resumed = subprocess.run([sys.executable, "-m", "core.run", str(recipe), "run.resume=auto"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"b: resumed at step {done}" in resumed.stdout
    a = load_file(str(straight / "run" / "b" / "model_000040.safetensors"))
    b = load_file(str(killed / "run" / "b" / "model_000040.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_under_ddp_and_fsdp_gives_the_weights_of_one_process_and_resumes(tmp_path):
    """2 gloo ranks with batch 2 against 1 process with batch 4 (tests/test_distributed.py's set-up), stage 2 a
    LoRA stage on all of stage 1; then the FSDP run cut back to its step-2 checkpoint and resumed."""
    from tests.test_distributed import COMMON
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("WORLD_SIZE", None)
    lora = [*COMMON, f"data.dataset.cache_dir={tmp_path / 'cache'}", "stages.0.steps=2", "stages.1.checkpoint_every=2",
            "stages.1.init_from.parts=[encoder,projector,decoder,vision_layout]",
            'stages.1.adapters=[{name: lora, r: 4, alpha: 8, targets: ["decoder.*.attn.*", "encoder.clip.*"]}]']

    def train(run_dir, ranks, *extra):
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
        done = subprocess.run([sys.executable, *launch, "-m", "core.run", GRID_RECIPE, f"run.dir={run_dir}", *lora,
                               f"data.batch_size={4 // ranks}", *extra], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    final = "vis_mid/model_000003.safetensors"
    train(tmp_path / "one", 1)
    one = load_file(str(tmp_path / "one" / final))
    assert all(".lora_" in k for k in one)
    for name, extra in (("ddp", []), ("fsdp", ["run.parallel=fsdp"])):
        train(tmp_path / name, 2, *extra)
        got = load_file(str(tmp_path / name / final))
        assert got.keys() == one.keys() and max((got[k] - one[k]).abs().max().item() for k in one) <= 1e-5, name
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "fsdp", cut)
    for name in os.listdir(cut / "vis_mid"):
        if "000003" in name:
            os.remove(cut / "vis_mid" / name)
    (cut / "vis_mid" / "latest.json").write_text(json.dumps({"step": 2, "model": "model_000002.safetensors"}))
    assert "vis_mid: resumed at step 2" in train(cut, 2, "run.parallel=fsdp", "run.resume=auto")
    resumed, fsdp = load_file(str(cut / final)), load_file(str(tmp_path / "fsdp" / final))
    assert max((resumed[k] - fsdp[k]).abs().max().item() for k in fsdp) <= 1e-6
