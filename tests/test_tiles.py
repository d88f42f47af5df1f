"""DeepSeek-OCR's gundam crops: grid choice, tiles, token layout and counts, training, generation, a run."""
import io
import itertools
import json
import random

import pytest
import torch
import webdataset as wds
from PIL import Image

from core import generate
from core.errors import ConfigError
from core.evaluate import decode_samples, sample_losses
from core.generate import grid_batches, load_checkpoint
from core.images import Tiling, candidate_grids, choose_grid, image_views
from core.model import build_model
from core.recipe import Crops, ModelConfig, load_recipe
from core.registry import load_plugins
from core.stream import train_batches
from tests.helpers import GRID_RECIPE, REAL, TINY

CROPS = Crops(tile_size=16, min_tiles=2, max_tiles=4)  # TINY: 32 px global (4x4 grid), 16 px tiles (2x2 each)
PROMPT = "<image>\nFree OCR."
# (width, height) -> grid (across, down) for CROPS: small (no crops), wide, tall, square, very wide
SIZES = {(16, 12): None, (40, 20): (2, 1), (20, 40): (1, 2), (36, 36): (2, 2), (64, 16): (4, 1)}


def dso_grid(width, height, image_size=640, min_num=2, max_num=9):
    """DeepSeek-OCR's dynamic_preprocess grid choice as published (InternVL's), the oracle."""
    if width <= image_size and height <= image_size:
        return None
    aspect_ratio = width / height
    target_ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                        if i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    best_ratio_diff, best_ratio, area = float("inf"), (1, 1), width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff, best_ratio = ratio_diff, ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


@pytest.fixture(scope="module")
def registry():
    return load_plugins()[1]


def crop_model(registry, seed=0, crops=CROPS):
    torch.manual_seed(seed)
    model, tok = build_model(ModelConfig(TINY.encoder, TINY.projector, TINY.decoder, TINY.tokenizer, crops), registry)
    with torch.no_grad():  # nanochat zeroes lm_head and output projections: the image would not reach the text
        for p in model.decoder.parameters():
            if not p.any():
                p.normal_(std=0.3)
    return model, tok


def picture(size, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


# ---- grid choice

def test_grid_rules():
    assert choose_grid(640, 640, 640) is None and choose_grid(10, 640, 640) is None  # both sides fit
    assert choose_grid(1280, 640, 640) == (2, 1) and choose_grid(641, 1920, 640) == (1, 3)  # aspect
    assert choose_grid(641, 641, 640, max_tiles=6) == (2, 2)  # 3x3 exceeds max_tiles
    # a tie (2x2 and 3x3 are both square): the larger grid only if area > 0.5 * 640^2 * 9 = 1,843,200
    assert choose_grid(1357, 1357, 640) == (2, 2) and choose_grid(1358, 1358, 640) == (3, 3)
    assert choose_grid(5000, 100, 640, min_tiles=2, max_tiles=6) == (6, 1)  # the widest allowed
    grids = candidate_grids(2, 6)
    assert all(2 <= a * d <= 6 for a, d in grids) and (1, 1) not in grids and (3, 3) not in grids
    assert {(1, 2), (2, 1), (2, 3), (3, 2), (1, 6), (6, 1)} <= set(grids)
    assert [a * d for a, d in grids] == sorted(a * d for a, d in grids)


def test_grid_choice_matches_dso_on_random_sizes():
    rng = random.Random(0)
    sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(3000)]
    sizes += [(w, h) for w in range(600, 2700, 37) for h in range(600, 2700, 41)]  # many exact-ratio ties
    for max_tiles in (6, 9):
        for w, h in sizes:
            assert choose_grid(w, h, 640, 2, max_tiles) == dso_grid(w, h, 640, 2, max_tiles), (w, h)


def test_tiles_are_row_major_and_global_view_is_padded():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    image = Image.new("RGB", (48, 32))
    for k, colour in enumerate(colours):  # 3 across, 2 down, one colour per 16 px cell
        image.paste(colour, (16 * (k % 3), 16 * (k // 3), 16 * (k % 3 + 1), 16 * (k // 3 + 1)))
    tiling = Tiling(16, 2, 6, (2, 2))
    pixels, cut, grid = image_views(image, 32, tiling)
    assert grid == (3, 2) and cut.shape == (6, 3, 16, 16) and pixels.shape == (3, 32, 32)
    for k, colour in enumerate(colours):
        expected = (torch.tensor(colour, dtype=torch.float32) / 255 - 0.5) / 0.5
        assert torch.allclose(cut[k], expected[:, None, None].expand(3, 16, 16)), k
    grey = (127 / 255 - 0.5) / 0.5
    assert torch.allclose(pixels[:, :5], torch.full((3, 5, 32), grey), atol=1e-6)  # 48x32 padded: bands above
    small, none, no_grid = image_views(Image.new("RGB", (16, 10)), 32, tiling)
    assert none is None and no_grid is None and small.shape == (3, 32, 32)


def test_recipe_keys_and_tile_fit(tmp_path, registry):
    recipe = load_recipe(GRID_RECIPE, ["model.crops={tile_size: 16, max_tiles: 4}"])
    assert recipe.model.crops == Crops(16, 2, 4)
    assert load_recipe(GRID_RECIPE).model.crops is None  # off by default
    bad = tmp_path / "bad.yaml"
    crops = "  crops: {min_tiles: 5, max_tiles: 3}"
    bad.write_text(open(GRID_RECIPE).read().replace("  tokenizer: {name: bytes}\n",
                                                       f"  tokenizer: {{name: bytes}}\n{crops}\n"))
    line = open(bad).read().splitlines().index(crops) + 1
    with pytest.raises(ConfigError, match=f"bad.yaml:{line}: model.crops: need 1 <= min_tiles <= max_tiles"):
        load_recipe(str(bad))
    with pytest.raises(ConfigError, match=r"model.crops.tile_sise: unknown key \(did you mean 'tile_size'\?\)"):
        load_recipe(GRID_RECIPE, ["model.crops={tile_sise: 16}"])
    with pytest.raises(ConfigError, match="model.crops.tile_size: 20 px gives the encoder a 2x2 grid.*multiple of 8"):
        build_model(ModelConfig(TINY.encoder, TINY.projector, TINY.decoder, TINY.tokenizer, Crops(20)), registry)


# ---- token layout and counts

def test_dry_run_prints_each_grids_count(capsys):
    from core.run import main
    assert main([GRID_RECIPE, "--dry-run", "model.crops={tile_size: 16, max_tiles: 3}"]) == 0
    out = capsys.readouterr().out
    # 21 global + (2*across + 1) * (2*down): 1x2 -> 21 + 3*4, 2x1 -> 21 + 5*2, 3x1 -> 21 + 7*2, 1x3 -> 21 + 3*6
    assert "vision tokens by grid (across x down): 1x2: 33, 2x1: 31, 3x1: 35, 1x3: 39" in out


def test_token_count_is_the_processors_formula(registry):
    with torch.device("meta"):
        model, _ = build_model(ModelConfig(REAL.encoder, REAL.projector, TINY.decoder, REAL.tokenizer, Crops(640)),
                               registry)  # DSO's DeepEncoder at 1024 px; the count does not depend on the decoder
    assert model.tiling.tile_grid == (10, 10)
    assert model.num_image_tokens() == 16 * 17 + 1 == 273
    for across, down in model.tiling.grids():  # DSO: (q+1)q + 1 + (q2*nw + 1)(q2*nh), q = 16, q2 = 10
        assert model.num_image_tokens((across, down)) == 273 + (10 * across + 1) * (10 * down)
    assert model.num_image_tokens((3, 2)) == 273 + (10 * 3 + 1) * (10 * 2)


class Marker(torch.nn.Module):
    """A projector whose outputs say where they came from: (call, image, row, column, 0...)."""

    def __init__(self, dim):
        super().__init__()
        self.dim, self.calls = dim, 0

    def forward(self, features):
        b, h, w, _ = features.shape
        out = torch.zeros(b, h, w, self.dim)
        out[..., 0] = self.calls
        out[..., 1] = torch.arange(b)[:, None, None].float()
        out[..., 2] = torch.arange(h)[None, :, None].float()
        out[..., 3] = torch.arange(w)[None, None, :].float()
        self.calls += 1
        return out


def test_local_rows_first_then_global_then_separator(registry):
    model, _ = crop_model(registry, crops=Crops(16, 2, 6))
    model.projector = Marker(model.decoder.n_embd)
    with torch.no_grad():
        model.image_newline.fill_(-1.0)
        model.view_separator.fill_(-2.0)
    grids = [(3, 2), None, (1, 2)]
    images = [picture(size, i) for i, size in enumerate([(48, 32), (16, 16), (16, 32)])]
    views = [image_views(im, 32, model.tiling) for im in images]
    assert [v[2] for v in views] == grids
    pixels = torch.stack([v[0] for v in views])
    cut = torch.cat([v[1] for v in views if v[1] is not None])
    _, _, sequences = model.encode_views(pixels, cut, grids)
    newline, separator = [-1.0] * 4, [-2.0] * 4
    tile_offset = 0
    for b, grid in enumerate(grids):
        expected = []
        if grid is not None:
            across, down = grid
            for r in range(2 * down):  # the tiles' 2x2 grids joined: row r crosses `across` tiles
                for c in range(2 * across):
                    expected.append([1.0, tile_offset + (r // 2) * across + c // 2, r % 2, c % 2])
                expected.append(newline)
            tile_offset += across * down
        for r in range(4):  # then the global view (call 0), its newlines and the separator
            expected += [[0.0, b, r, c] for c in range(4)] + [newline]
        expected.append(separator)
        assert sequences[b][:, :4].tolist() == expected, b
        assert len(sequences[b]) == model.num_image_tokens(grid)
    with pytest.raises(ValueError, match="need 8 tiles; got 9"):
        model.encode_views(pixels, torch.cat([cut, cut[:1]]), grids)


# ---- training and generation with mixed grids

def shard(path, sizes, start=0):
    with wds.TarWriter(str(path), encoder=False) as sink:
        for i, size in enumerate(sizes):
            buf = io.BytesIO()
            picture(size, start + i).save(buf, format="PNG")
            sink.write({"__key__": f"k{start + i}", "png": buf.getvalue(), "txt": f"w{start + i}".encode()})
    return str(path)


def test_stream_counts_each_images_tokens_and_a_mixed_batch_trains(tmp_path, registry):
    model, tok = crop_model(registry)
    path = shard(tmp_path / "train-000000.tar", list(SIZES) * 2)
    args = dict(tokenizer=tok, image_size=32, prompt=PROMPT, num_image_tokens=model.num_image_tokens(), max_len=64,
                batch_size=5, shuffle_buffer=1, epochs=1, tiling=model.tiling)
    batch = next(train_batches([path], **args))
    by_key = {f"k{i}": grid for i, grid in enumerate(list(SIZES.values()) * 2)}
    assert batch["grids"] == [by_key[k] for k in batch["keys"]] and None in batch["grids"]
    counts = (batch["input_ids"] == tok.image_id).sum(dim=1).tolist()
    assert counts == [model.num_image_tokens(g) for g in batch["grids"]]
    assert batch["tiles"].shape == (sum(g[0] * g[1] for g in batch["grids"] if g), 3, 16, 16)
    model.train()
    out = model(batch["pixel_values"], batch["input_ids"], batch["targets"], tiles=batch["tiles"],
                grids=batch["grids"])
    assert torch.isfinite(out["loss"]) and out["vision_features"].shape == (5, 4, 4, model.encoder.out_dim)
    assert out["vision_tokens"].shape == (5, 21, model.decoder.n_embd)  # the global view's, as regularisers expect
    out["loss"].backward()
    assert model.encoder.sam.patch_embed.proj.weight.grad.abs().sum() > 0
    # the over-long check counts the real tokens: bos + 2x2 crops' 21 + 20 tokens + "\nFree OCR." = 52 leave no
    # room in max_len 51 (skipped), 4x1's 50 leave one (the answer is cut)
    stream = train_batches([path], **{**args, "max_len": 51, "batch_size": 1})
    keys = [k for b in stream for k in b["keys"]]
    assert sorted(keys) == sorted(f"k{i}" for i in range(10) if i not in (3, 8))
    assert stream.stats == {"long_image": 2, "truncated_target": 2}


def test_crop_stream_resumes_exactly(tmp_path, registry):
    model, tok = crop_model(registry)
    path = shard(tmp_path / "train-000000.tar", list(SIZES) * 3)
    args = dict(tokenizer=tok, image_size=32, prompt=PROMPT, num_image_tokens=model.num_image_tokens(), max_len=64,
                batch_size=2, shuffle_buffer=4, tiling=model.tiling, seed=3)
    whole = list(itertools.islice(train_batches([path], **args), 5))
    first = train_batches([path], **args)
    list(itertools.islice(first, 2))
    again = train_batches([path], **args)
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    other = train_batches([path], **{**args, "tiling": Tiling(16, 2, 6, (2, 2))})
    with pytest.raises(ConfigError, match=r"data state: crops is \[16, 2, 4\] in the saved state but \[16, 2, 6\]"):
        other.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for a, b in zip(whole[2:], itertools.islice(again, 3)):
        assert a["keys"] == b["keys"] and a["grids"] == b["grids"] and torch.equal(a["input_ids"], b["input_ids"])
        assert (a["tiles"] is None and b["tiles"] is None) or torch.equal(a["tiles"], b["tiles"])


def test_grouped_generation_equals_one_image_at_a_time(registry):
    model, tok = crop_model(registry)
    model.eval()
    sizes = [(40, 20), (16, 12), (20, 40), (40, 20), (36, 36), (16, 12), (40, 20)]
    samples = [{"key": f"k{i}", "image": picture(size, i), "text": "ab"} for i, size in enumerate(sizes)]
    assert grid_batches([(2, 1), None, (1, 2), (2, 1), (2, 2), None, (2, 1)], 2) == [[0, 3], [6], [1, 5], [2], [4]]
    grouped = decode_samples(model, tok, samples, PROMPT, "cpu", max_new_tokens=6, batch_size=4)
    single = [decode_samples(model, tok, [s], PROMPT, "cpu", max_new_tokens=6)[0] for s in samples]
    assert grouped == single and len(set(grouped)) > 1
    losses = sample_losses(model, tok, samples, PROMPT, "cpu", max_len=64, batch_size=4)
    assert losses == pytest.approx([sample_losses(model, tok, [s], PROMPT, "cpu", max_len=64)[0] for s in samples],
                                   rel=1e-4)


# ---- a run with crops, then python -m core.generate on its checkpoint

def test_tiny_run_with_crops_and_the_cli_uses_them(cli, tmp_path):
    sizes = list(SIZES)
    train = shard(tmp_path / "train-000000.tar", sizes * 4)
    eval_ = shard(tmp_path / "eval-000000.tar", sizes, start=100)
    run_dir = tmp_path / "run"
    stage = ("[{name: s1, steps: 3, probe_every: 2, monitor_every: 2, "
             "regularisers: [{name: cell_reading, weight: 1.0}]}]")
    result = cli("core.run", GRID_RECIPE, f"run.dir={run_dir}", "run.threads=1", f"stages={stage}",
                 f"data.dataset={{name: shards, train: '{train}', eval: '{eval_}'}}", "data.batch_size=5",
                 "model.crops={tile_size: 16, min_tiles: 2, max_tiles: 4}", "eval.samples=5", "eval.max_new_tokens=4")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run_dir / "eval.json").read_text())["aggregate"]["samples"] == 5
    model, tok, meta = load_checkpoint(str(run_dir / "s1"))
    assert meta["model"]["crops"] == {"tile_size": 16, "min_tiles": 2, "max_tiles": 4}
    assert model.tiling == Tiling(16, 2, 4, (2, 2))
    paths = []
    for i, size in enumerate(sizes):
        paths.append(str(tmp_path / f"page{i}.png"))
        picture(size, 200 + i).save(paths[-1])
    out = tmp_path / "preds.jsonl"  # python -m core.generate, in this process
    assert generate.main([str(run_dir / "s1"), *paths, "--out", str(out), "--max-new-tokens", "4",
                          "--batch-size", "2"]) == 0
    samples = [{"key": p, "image": Image.open(p), "text": ""} for p in paths]
    expected = decode_samples(model, tok, samples, meta["prompt"], "cpu", max_new_tokens=4)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"id": p, "text": t} for p, t in zip(paths, expected)]
