"""Pretrained vision weights: vlmkit's SAM / CLIP / DeepEncoder load transformers' and DeepSeek-OCR's layouts
exactly, and refuse loudly otherwise.

Tiny transformers reference models with random weights are saved with save_pretrained, loaded
through the encoders' recipe arguments (weights=, weights_format=) and run on the same input as
vlmkit's modules: fp32 outputs must agree to 1e-4. Needs transformers (a test-only dependency).
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from core.errors import ConfigError  # noqa: E402
from core.registry import Registry  # noqa: E402
from core.weights import load_state, read_state_dict  # noqa: E402
from plugins.encoders import clip as clip_mod, deepencoder as deep_mod, sam as sam_mod  # noqa: E402
from plugins.encoders.clip import CLIPVisionTower  # noqa: E402
from plugins.encoders.deepencoder import DeepEncoder  # noqa: E402
from plugins.encoders.pretrained import clip_from_hf, sam_from_hf  # noqa: E402
from plugins.encoders.sam import SAMEncoder  # noqa: E402

torch.set_num_threads(1)
ATOL = 1e-4

# the same tiny SAM in both libraries: image 64, patch 8 (grid 8), hidden 32, 2 layers, window 2, global [1]
HF_SAM = dict(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              window_size=2, global_attn_indexes=[1], output_channels=32, mlp_dim=128)
VLM_SAM = dict(image_size=64, patch_size=8, dim=32, depth=2, heads=2, mlp_ratio=4.0, window_size=2,
               global_attn_indexes=[1], out_chans=32, downsample_channels=[24, 40])
HF_CLIP = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2)
VLM_CLIP = dict(image_size=32, patch_size=8, dim=32, depth=2, heads=2, mlp_dim=64)
TINY_SAM = dict(patch_size=4, dim=32, depth=2, heads=2, window_size=3, global_attn_indexes=[1],
                out_chans=16, downsample_channels=[24, 32], downsample_strides=[2, 2])
TINY_CLIP = dict(patch_size=4, dim=32, depth=1, heads=2, mlp_dim=64)


@pytest.fixture(scope="module")
def registry():
    reg = Registry()
    for mod in (sam_mod, clip_mod, deep_mod):
        mod.vlmkit_register(reg)
    return reg


def randomize(module, seed=0):
    """Every parameter random (HF zero-inits pos_embed and rel_pos: those must be exercised too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.2
            is_norm_weight = name.endswith("weight") and p.ndim == 1 and "norm" in name
            p.copy_(1.0 + noise * 0.5 if is_norm_weight else noise)
    return module.eval()


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_state(module, snap):
    sd = module.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in sd)


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


# ---- SAM ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_sam_dir(tmp_path_factory):
    """A transformers SamModel (vision encoder + prompt encoder + mask decoder), as facebook/sam-vit-base is."""
    from transformers import SamConfig, SamModel
    model = randomize(SamModel(SamConfig(vision_config=HF_SAM)), seed=1)
    path = tmp_path_factory.mktemp("hf_sam")
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("fmt", ["auto", "hf"])
def test_sam_from_hf_matches_transformers(hf_sam_dir, registry, fmt, capsys):
    path, hf = hf_sam_dir
    sam = registry.build("encoder", "sam", weights=str(path), weights_format=fmt, **VLM_SAM)
    out = capsys.readouterr().out
    assert "(hf layout)" in out and str(path) in out
    # net_2 / net_3 are not in a SAM checkpoint: they start fresh, and that is said
    assert sam.pretrained_report["fresh"] == ["net_2.weight", "net_3.weight"]
    assert "starting fresh" in out and "net_2.weight" in out and "net_3.weight" in out
    pix = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = hf.vision_encoder(pixel_values=pix).last_hidden_state  # the neck's output, (B, C, 8, 8)
        got = sam.forward_neck(pix)
    assert ref.shape == got.shape == (2, 32, 8, 8)
    assert (ref - got).abs().max().item() <= ATOL
    assert ref.abs().max().item() > 0.1  # not a trivially small map


def test_sam_vision_model_bare_keys_and_mapping(tmp_path):
    from transformers import SamVisionConfig, SamVisionModel
    hf = randomize(SamVisionModel(SamVisionConfig(**HF_SAM)), seed=2)
    sd = {k: v for k, v in hf.state_dict().items()}
    mapped = sam_from_hf(sd)
    expect = set(SAMEncoder(**VLM_SAM).state_dict()) - {"net_2.weight", "net_3.weight"}
    assert set(mapped) == expect
    # bare keys (the encoder saved on its own) map the same way
    bare = sam_from_hf({k[len("vision_encoder."):]: v for k, v in sd.items()})
    assert set(bare) == expect and all(torch.equal(bare[k], mapped[k]) for k in expect)
    assert torch.equal(mapped["neck.2.weight"], sd["vision_encoder.neck.conv2.weight"])
    assert torch.equal(mapped["blocks.1.norm2.bias"], sd["vision_encoder.layers.1.layer_norm2.bias"])


def test_sam_from_deepseek_ocr2_matches_transformers(tmp_path, registry, capsys):
    try:
        from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2SamVisionConfig
        from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2SamVisionEncoder
    except ImportError:
        pytest.skip("this transformers has no deepseek_ocr2")
    cfg = dict(HF_SAM, downsample_channels=[24, 40])
    cfg.pop("mlp_dim")
    hf = randomize(DeepseekOcr2SamVisionEncoder(DeepseekOcr2SamVisionConfig(**cfg)), seed=3)
    hf.save_pretrained(tmp_path)
    sam = registry.build("encoder", "sam", weights=str(tmp_path), **VLM_SAM)  # auto-detected
    out = capsys.readouterr().out
    assert "(deepseek_ocr2 layout)" in out and "fresh" not in out
    assert sam.pretrained_report["fresh"] == [] and "net_3.weight" in sam.pretrained_report["loaded"]
    # the compressor included; 48 is not the native 64: both interpolate pos_embed / rel-pos the same way
    for size in (64, 48):
        pix = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref = hf(pix).last_hidden_state
            got = sam.forward_features(pix)
        assert ref.shape == got.shape == (2, 40, *sam.grid_size(size, size))
        assert (ref - got).abs().max().item() <= ATOL


def test_segment_anything_pth_loads_and_reports_fresh_compressor(tmp_path, capsys):
    torch.manual_seed(0)
    src = randomize(SAMEncoder(**VLM_SAM), seed=4)
    sd = {f"image_encoder.{k}": v for k, v in src.state_dict().items() if not k.startswith(("net_2.", "net_3."))}
    sd["prompt_encoder.point_embeddings.0.weight"] = torch.randn(1, 32)
    sd["mask_decoder.iou_token.weight"] = torch.randn(1, 32)
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(sd, path)
    sam = SAMEncoder(**VLM_SAM, weights=str(path))
    out = capsys.readouterr().out
    assert "(segment_anything layout)" in out and "net_2.weight, net_3.weight" in out
    assert sam.pretrained_report["fresh"] == ["net_2.weight", "net_3.weight"]
    mine, theirs = sam.state_dict(), src.state_dict()
    for k in mine:
        if not k.startswith(("net_2.", "net_3.")):
            assert torch.equal(mine[k], theirs[k]), k


# ---- CLIP ---------------------------------------------------------------------------------------

def _hf_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    return randomize(CLIPVisionModel(CLIPVisionConfig(**HF_CLIP)), seed=5)


def _hf_clip_full():
    from transformers import CLIPConfig, CLIPModel
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                bos_token_id=0, eos_token_id=1, pad_token_id=1, vocab_size=64)
    model = randomize(CLIPModel(CLIPConfig(text_config=text, vision_config=HF_CLIP, projection_dim=8)), seed=6)
    return model, model.vision_model


@pytest.mark.parametrize("which", ["vision_model", "clip_model"])
def test_clip_from_hf_matches_transformers(tmp_path, registry, which, capsys):
    if which == "vision_model":
        saved = ref_model = _hf_clip_vision()
    else:
        saved, ref_model = _hf_clip_full()  # keys under vision_model., plus text model, projections, logit_scale
    saved.save_pretrained(tmp_path)
    tower = CLIPVisionTower(**VLM_CLIP, weights=str(tmp_path / "model.safetensors"), weights_format="auto")
    assert "(hf layout)" in capsys.readouterr().out
    assert torch.equal(tower.embeddings.position_ids, torch.arange(17)[None])  # not in the file: filled
    pix = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = ref_model(pixel_values=pix).last_hidden_state  # before post_layernorm, as DSO uses it
        got = tower(pix)
    assert ref.shape == got.shape == (2, 17, 32)
    assert (ref - got).abs().max().item() <= ATOL
    # the registered encoder ("clip") takes the same arguments; its grid is the tower's output without CLS
    enc = registry.build("encoder", "clip", weights=str(tmp_path), weights_format="hf", **VLM_CLIP)
    with torch.no_grad():
        assert (enc(pix).reshape(2, 16, 32) - ref[:, 1:]).abs().max().item() <= ATOL


def test_clip_qkv_fusion_order():
    hf = _hf_clip_vision()
    sd = hf.state_dict()
    mapped = clip_from_hf(sd)
    assert set(mapped) == set(CLIPVisionTower(**VLM_CLIP).state_dict())
    w = mapped["transformer.layers.1.self_attn.qkv_proj.weight"]
    b = mapped["transformer.layers.1.self_attn.qkv_proj.bias"]
    for i, s in enumerate("qkv"):
        assert torch.equal(w[32 * i:32 * (i + 1)], sd[f"encoder.layers.1.self_attn.{s}_proj.weight"])
        assert torch.equal(b[32 * i:32 * (i + 1)], sd[f"encoder.layers.1.self_attn.{s}_proj.bias"])


# ---- refusing, loudly, and loading nothing -----------------------------------------------------------

def test_clip_file_given_as_sam_is_refused_and_nothing_loads(tmp_path):
    _hf_clip_vision().save_pretrained(tmp_path)
    path = str(tmp_path / "model.safetensors")
    sam = SAMEncoder(**VLM_SAM)
    before = snapshot(sam)
    with pytest.raises(ConfigError) as e:  # auto: no SAM layout fits
        sam.load_pretrained(path)
    msg = one_line_error(e)
    assert path in msg and "cannot tell" in msg and "segment_anything" in msg and "embeddings.class_embedding" in msg
    with pytest.raises(ConfigError) as e:  # told it is HF SAM: every key is checked and named
        sam.load_pretrained(path, "hf")
    msg = one_line_error(e)
    assert msg.startswith(f"{path} (hf layout): does not fit sam (SAMEncoder): missing 37: blocks.0.attn.proj.bias")
    assert "unexpected 39: embeddings.class_embedding" in msg and "(+" in msg
    assert same_state(sam, before)
    with pytest.raises(ConfigError, match="weights_format: 'clip' is not one of auto, hf"):
        SAMEncoder(**VLM_SAM, weights=path, weights_format="clip")


def test_partly_fitting_file_loads_nothing(hf_sam_dir):
    path, _ = hf_sam_dir
    sam = SAMEncoder(**dict(VLM_SAM, out_chans=16))  # the neck is narrower than the file's: blocks would fit
    before = snapshot(sam)
    with pytest.raises(ConfigError) as e:
        sam.load_pretrained(path, "hf")
    msg = one_line_error(e)
    assert "shape-mismatched 6: neck.0.weight (file (32, 32, 1, 1) vs model (16, 32, 1, 1))" in msg
    assert "missing" not in msg and "unexpected" not in msg
    assert same_state(sam, before)  # blocks.* fitted, and were not loaded either


def test_unreadable_files_name_the_file(tmp_path, hf_sam_dir):
    src, _ = hf_sam_dir
    data = (src / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(ConfigError) as e:
        SAMEncoder(**VLM_SAM, weights=str(cut))
    msg = one_line_error(e)
    assert msg.startswith(str(cut)) and "truncated" in msg
    pth = tmp_path / "cut.pth"
    torch.save({"a": torch.randn(64, 64)}, pth)
    pth.write_bytes(pth.read_bytes()[:300])
    with pytest.raises(ConfigError) as e:
        CLIPVisionTower(**VLM_CLIP, weights=str(pth))
    assert one_line_error(e).startswith(str(pth))
    with pytest.raises(ConfigError, match="does not exist"):
        SAMEncoder(**VLM_SAM, weights=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ConfigError, match="a folder without a weight file"):
        SAMEncoder(**VLM_SAM, weights=str(tmp_path / "."))


# ---- core.weights on its own -------------------------------------------------------------------------

def test_load_state_non_strict_report_and_meta(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = {"0.weight": torch.ones(3, 4), "0.bias": torch.ones(5), "2.weight": torch.zeros(1)}
    before = snapshot(lin)
    report = load_state(lin, state, "x.safetensors", strict=False)
    assert report["loaded"] == ["0.weight"] and report["unexpected"] == ["2.weight"]
    assert report["missing"] == ["1.bias", "1.weight"] and report["mismatched"] == [("0.bias", (5,), (3,))]
    assert torch.equal(lin[0].weight, torch.ones(3, 4)) and torch.equal(lin[0].bias, before["0.bias"])
    # {"state_dict": sd} is unwrapped
    torch.save({"state_dict": lin.state_dict(), "epoch": 3}, tmp_path / "w.pt")
    assert set(read_state_dict(tmp_path / "w.pt")) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    # a module on the meta device (a dry run) is not loaded into, and the file is not read (these bytes are no
    # safetensors file); but it must exist, as a decoder checkpoint must (a dry run checks every weight path)
    (tmp_path / "unread.safetensors").write_bytes(b"not read on meta")
    with torch.device("meta"):
        meta = SAMEncoder(**VLM_SAM, weights=str(tmp_path / "unread.safetensors"))
        assert load_state(torch.nn.Linear(2, 2), {}, "x")["loaded"] == []
        with pytest.raises(ConfigError, match="absent.safetensors: weight file does not exist"):
            SAMEncoder(**VLM_SAM, weights=str(tmp_path / "absent.safetensors"))
    assert meta.pretrained_report == {"loaded": [], "fresh": [], "missing": [], "unexpected": [], "mismatched": []}


# ---- DeepSeek-OCR's checkpoint -----------------------------------------------------------------------

def test_deepencoder_from_deepseek_ocr_round_trip(tmp_path, registry, capsys):
    src = randomize(DeepEncoder(image_size=32, sam=TINY_SAM, clip=TINY_CLIP), seed=7)
    ckpt = {}
    for k, v in src.state_dict().items():
        if k == "clip.embeddings.position_ids":
            continue  # some files lack it: filled with arange
        head, rest = k.split(".", 1)
        ckpt[f"model.{'sam_model' if head == 'sam' else 'vision_model'}.{rest}"] = v.clone()
    extras = {"model.projector.layers.weight": torch.randn(8, 64), "model.projector.layers.bias": torch.randn(8),
              "model.image_newline": torch.randn(8), "model.view_seperator": torch.randn(8)}
    lm = {"model.embed_tokens.weight": torch.randn(50, 8), "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
          "model.norm.weight": torch.randn(8), "lm_head.weight": torch.randn(50, 8)}
    path = tmp_path / "deepseek_ocr.safetensors"
    save_file({**ckpt, **extras, **lm}, path)
    enc = registry.build("encoder", "deepencoder", image_size=32, sam=TINY_SAM, clip=TINY_CLIP, weights=str(path))
    out = capsys.readouterr().out
    assert "DeepSeek-OCR layout" in out and "kept for the model builder" in out
    assert same_state(enc, src.state_dict())
    assert set(enc.pretrained_extras) == {"projector.layers.weight", "projector.layers.bias",
                                          "image_newline", "view_separator"}
    for k, v in enc.pretrained_extras.items():
        assert torch.equal(v, extras["model." + k.replace("view_separator", "view_seperator")])
    pix = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc(pix), src(pix))
    # the same file for the SAM half alone (compressor included), through the sub-dict
    enc2 = DeepEncoder(image_size=32, sam=dict(TINY_SAM, weights=str(path)), clip=TINY_CLIP)
    assert "(deepseek_ocr layout)" in capsys.readouterr().out
    assert same_state(enc2.sam, src.sam.state_dict())
    with pytest.raises(ConfigError, match="both given"):
        DeepEncoder(image_size=32, sam=dict(TINY_SAM, weights=str(path)), clip=TINY_CLIP, weights=str(path))
    # a file that is not DeepSeek-OCR's
    save_file({"sam.patch_embed.proj.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match="not a DeepSeek-OCR checkpoint"):
        DeepEncoder(image_size=32, sam=TINY_SAM, clip=TINY_CLIP, weights=str(tmp_path / "other.safetensors"))


# ---- real sizes, on the meta device (no memory): the mapped layouts fit vlmkit's ViT-B / ViT-L ----------

def test_real_size_layouts_fit_on_meta(capsys, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, SamVisionConfig, SamVisionModel
    from plugins.encoders.pretrained import sam_from_deepseek_ocr2

    def shapes(sd):
        return {k: tuple(v.shape) for k, v in sd.items()}
    with torch.device("meta"):
        hf_sam = SamVisionModel(SamVisionConfig())  # facebook/sam-vit-base's sizes (docs/architecture.md §3.1)
        hf_clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                   num_attention_heads=16, patch_size=14, image_size=224))
        (tmp_path / "dso.safetensors").write_bytes(b"not read on meta")
        enc = DeepEncoder(weights=str(tmp_path / "dso.safetensors"))  # a dry run: the file is not read
    assert "built on the meta device" in capsys.readouterr().out
    sam_keys = shapes(enc.sam.state_dict())
    assert shapes(sam_from_hf(hf_sam.state_dict())) == {k: v for k, v in sam_keys.items()
                                                        if not k.startswith(("net_2.", "net_3."))}
    assert shapes(clip_from_hf(hf_clip.state_dict())) == shapes(enc.clip.state_dict())
    try:
        from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2SamVisionConfig
        from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import DeepseekOcr2SamVisionEncoder
    except ImportError:
        return
    with torch.device("meta"):
        ds2 = DeepseekOcr2SamVisionEncoder(DeepseekOcr2SamVisionConfig())  # OCR-2: compressor 256 -> 512 -> 896
        sam2 = SAMEncoder(downsample_channels=(512, 896))
    assert shapes(sam_from_deepseek_ocr2(ds2.state_dict())) == shapes(sam2.state_dict())
