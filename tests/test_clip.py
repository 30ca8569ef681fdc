"""Tests of the CLIP backbone (model/clip.py): open_clip parity, weight loading, helpers."""

from __future__ import annotations

import hashlib
import io
import math
import os
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn.functional as F
from easydict import EasyDict

from model import clip as clip_mod
from model.clip import (
    CLIP,
    CLIP_PRESETS,
    OPENAI_URLS,
    build_clip,
    build_clip_from_config,
    infer_clip_config,
    resize_pos_embed,
)
from model.weights import IncompatibleWeightsError
from utils.config import ConfigError
from utils.errors import UserInputError

TINY_SIZE = (64, 32)
EOT = 49407
SOT = 49406

# Reduced-width architecture for the open_clip parity test (runs in seconds at 224).
SMALL = {**CLIP_PRESETS["tiny"], "transformer_layers": 2}


def _tiny(image_size=TINY_SIZE, seed: int = 0, **overrides) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(**{**CLIP_PRESETS["tiny"], **overrides}, image_size=image_size, stride_size=16).eval()


def _random_ids(batch: int, seed: int = 0, length: int = 77) -> torch.Tensor:
    """Token ids laid out as the tokenizer does: SOT, words, EOT, zero padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, length, dtype=torch.long)
    for row in range(batch):
        n_words = int(torch.randint(1, length - 2, (1,), generator=gen))
        ids[row, 0] = SOT
        ids[row, 1 : 1 + n_words] = torch.randint(1, 49400, (n_words,), generator=gen)
        ids[row, 1 + n_words] = EOT
    return ids


def _images(batch: int, size, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))


def _text_features(model: CLIP, ids: torch.Tensor) -> torch.Tensor:
    tokens = model.encode_text(ids)
    return tokens[torch.arange(ids.shape[0]), ids.argmax(-1)]


# ---------------------------------------------------------------- open_clip parity


@pytest.mark.parametrize("image_size", [(224, 224), (384, 128)])
def test_parity_with_open_clip(image_size):
    from open_clip.model import CLIP as OpenCLIP
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    ours = CLIP(**SMALL, image_size=image_size, stride_size=16).eval()
    theirs = OpenCLIP(
        SMALL["embed_dim"],
        vision_cfg=CLIPVisionCfg(
            layers=SMALL["vision_layers"],
            width=SMALL["vision_width"],
            head_width=64,
            patch_size=SMALL["vision_patch_size"],
            image_size=image_size,
        ),
        text_cfg=CLIPTextCfg(
            context_length=77,
            vocab_size=49408,
            width=SMALL["transformer_width"],
            heads=SMALL["transformer_heads"],
            layers=SMALL["transformer_layers"],
        ),
        quick_gelu=True,
    ).eval()
    # Same key names, so this load proves the layouts agree (incl. the positional grid); only
    # open_clip's learnable temperature is absent from ours (retrieval uses a fixed one).
    result = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert result.missing_keys == ["logit_scale"] and result.unexpected_keys == []

    images = _images(2, image_size)
    ids = _random_ids(3)
    with torch.no_grad():
        ours_img = ours.encode_image(images)
        ours_txt = _text_features(ours, ids)
        theirs_img = theirs.encode_image(images)
        theirs_txt = theirs.encode_text(ids)
    grid = (image_size[0] // 16) * (image_size[1] // 16)
    assert ours_img.shape == (2, 1 + grid, SMALL["embed_dim"])
    assert (ours_img[:, 0] - theirs_img).abs().max() <= 1e-5
    assert (ours_txt - theirs_txt).abs().max() <= 1e-5
    # The features are not trivially equal (e.g. all zeros).
    assert ours_img[:, 0].abs().max() > 1e-2 and ours_txt.abs().max() > 1e-2


# ---------------------------------------------------------------- module contracts


def test_shapes_and_state_dict_keys():
    model = _tiny()
    keys = set(model.state_dict())
    for key in [
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.ln_pre.weight",
        "visual.transformer.resblocks.1.attn.in_proj_weight",
        "visual.transformer.resblocks.1.attn.in_proj_bias",
        "visual.transformer.resblocks.1.attn.out_proj.weight",
        "visual.transformer.resblocks.1.mlp.c_fc.weight",
        "visual.transformer.resblocks.1.mlp.c_proj.bias",
        "visual.ln_post.bias",
        "visual.proj",
        "transformer.resblocks.3.ln_2.weight",
        "token_embedding.weight",
        "positional_embedding",
        "ln_final.weight",
        "text_projection",
    ]:
        assert key in keys, key
    assert "visual.conv1.bias" not in keys
    assert "logit_scale" not in keys  # the reference backbones (IRRA, GA-DMS) have none
    assert model.visual.positional_embedding.shape == (1 + 4 * 2, 128)
    assert model.text_projection.shape == (128, 64)
    with torch.no_grad():
        assert model.encode_image(_images(2, TINY_SIZE)).shape == (2, 9, 64)
        assert model.encode_text(_random_ids(2)).shape == (2, 77, 64)


def test_stride_gives_overlapping_grid():
    model = CLIP(**CLIP_PRESETS["tiny"], image_size=TINY_SIZE, stride_size=12).eval()
    # grid_h = (64 - 16) // 12 + 1 = 5, grid_w = (32 - 16) // 12 + 1 = 2
    assert model.visual.grid_size == (5, 2)
    with torch.no_grad():
        assert model.encode_image(_images(1, TINY_SIZE)).shape == (1, 11, 64)


def test_unknown_preset_lists_valid_names():
    cfg = EasyDict(
        arch="ViT-X/99", pretrained="", image_size=[64, 32], stride_size=16, cache_dir="", grad_checkpointing=False
    )
    with pytest.raises(ValueError, match=r"ViT-X/99.*ViT-B/16.*tiny"):
        build_clip_from_config(cfg)


def test_wrong_image_size_is_rejected():
    with pytest.raises(ValueError, match=r"\(64, 32\).*\(32, 32\)"):
        _tiny().encode_image(_images(1, (32, 32)))


def test_text_layers_split_and_block_internals_match_encode_text():
    """GASS runs the first layers via the helpers and re-implements a block from its parts."""
    model = _tiny()
    ids = _random_ids(2, seed=3)
    with torch.no_grad():
        full = model.encode_text(ids)
        x = model.text_layers_forward(model.embed_text(ids), 0, 2)
        block = model.transformer.resblocks[2]
        # Naive re-implementation with an explicit causal mask from the exposed attributes.
        h = block.ln_1(x)
        q, k, v = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
        b, n, d = q.shape
        heads = [t.reshape(b, n, block.n_head, d // block.n_head).transpose(1, 2) for t in (q, k, v)]
        logits = heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(d // block.n_head)
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        attn = (logits.softmax(-1) @ heads[2]).transpose(1, 2).reshape(b, n, d)
        x = x + block.attn.out_proj(attn)
        x = x + block.mlp(block.ln_2(x))
        x = model.text_layers_forward(x, 3, None)
        assert block.d_model == 128
        torch.testing.assert_close(model.project_text(x), full, atol=1e-5, rtol=1e-5)


def test_text_is_causal():
    model = _tiny()
    ids = _random_ids(1, seed=5)
    changed = ids.clone()
    changed[0, 60] = 123  # causal: tokens before position 60 must not change
    with torch.no_grad():
        a, b = model.encode_text(ids), model.encode_text(changed)
    torch.testing.assert_close(a[:, :60], b[:, :60])
    assert (a[:, 60:] - b[:, 60:]).abs().max() > 1e-4


def test_grad_checkpointing_same_outputs_and_gradients():
    plain = _tiny().train()
    ckpt = _tiny(seed=1).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.grad_checkpointing = True
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1

    for block in list(ckpt.transformer.resblocks) + list(ckpt.visual.transformer.resblocks):
        # A pre-hook: recomputation stops early once the saved tensors are rebuilt.
        block.register_forward_pre_hook(count)
    images, ids = _images(2, TINY_SIZE), _random_ids(2)
    outputs = []
    for model in (plain, ckpt):
        img, txt = model(images, ids)
        (img.square().mean() + txt.square().mean()).backward()
        outputs.append((img.detach(), txt.detach()))
    # 6 blocks run in forward and again in the backward recomputation.
    assert calls["n"] == 12
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    for (name, p1), p2 in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert p1.grad is not None and p1.grad.abs().max() > 0, name
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-7, rtol=1e-6, msg=name)


def test_autocast_bf16_runs():
    model = _tiny()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        img = model.encode_image(_images(2, TINY_SIZE))
        txt = model.encode_text(_random_ids(2))
    assert img.dtype == torch.bfloat16 and txt.dtype == torch.bfloat16
    assert torch.isfinite(img.float()).all() and torch.isfinite(txt.float()).all()


# ---------------------------------------------------------------- resize_pos_embed


def _naive_bilinear(grid: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """Per-channel bilinear resize, align_corners=False, written out with scalar loops."""
    in_h, in_w, channels = grid.shape

    def source(dst: int, in_size: int, out_size: int) -> tuple[int, int, float]:
        src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
        lo = int(src)
        return lo, min(lo + 1, in_size - 1), src - lo

    out = torch.zeros(out_h, out_w, channels, dtype=torch.float64)
    for i in range(out_h):
        y0, y1, wy = source(i, in_h, out_h)
        for j in range(out_w):
            x0, x1, wx = source(j, in_w, out_w)
            out[i, j] = (
                (1 - wy) * (1 - wx) * grid[y0, x0]
                + (1 - wy) * wx * grid[y0, x1]
                + wy * (1 - wx) * grid[y1, x0]
                + wy * wx * grid[y1, x1]
            )
    return out


def test_resize_pos_embed_identity():
    posemb = torch.randn(1 + 14 * 14, 8)
    torch.testing.assert_close(resize_pos_embed(posemb, (14, 14)), posemb, atol=0, rtol=0)


@pytest.mark.parametrize("new_grid", [(24, 8), (5, 2), (16, 16)])
def test_resize_pos_embed_matches_naive_bilinear(new_grid):
    posemb = torch.randn(1 + 7 * 7, 5, dtype=torch.float64)
    out = resize_pos_embed(posemb, new_grid)
    assert out.shape == (1 + new_grid[0] * new_grid[1], 5)
    torch.testing.assert_close(out[0], posemb[0], atol=0, rtol=0)
    expected = _naive_bilinear(posemb[1:].reshape(7, 7, 5), *new_grid).reshape(-1, 5)
    torch.testing.assert_close(out[1:].double(), expected, atol=1e-6, rtol=1e-6)


def test_resize_pos_embed_non_square_needs_old_grid():
    with pytest.raises(ValueError, match="old_grid"):
        resize_pos_embed(torch.randn(1 + 24 * 8, 4), (14, 14))
    assert resize_pos_embed(torch.randn(1 + 24 * 8, 4), (12, 4), old_grid=(24, 8)).shape == (1 + 48, 4)


# ---------------------------------------------------------------- loading weights


def _outputs(model: CLIP, size=TINY_SIZE):
    with torch.no_grad():
        return model.encode_image(_images(2, size, seed=7)), model.encode_text(_random_ids(2, seed=7))


def test_infer_clip_config_recovers_architecture():
    sd = _tiny().state_dict()
    assert infer_clip_config(sd) == CLIP_PRESETS["tiny"]
    with torch.device("meta"):  # shapes only; skips allocating and initialising 150M weights
        b16 = CLIP(**CLIP_PRESETS["ViT-B/16"], image_size=(224, 224), stride_size=16)
    assert infer_clip_config(b16.state_dict()) == CLIP_PRESETS["ViT-B/16"]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive_loads_exactly(tmp_path):
    model = _tiny()
    images, ids = _images(1, TINY_SIZE), _random_ids(1)
    with torch.no_grad(), pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(model, (images, ids), check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))
    loaded = build_clip(str(path), image_size=TINY_SIZE)
    for expected, got in zip(_outputs(model), _outputs(loaded), strict=True):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_fp16_state_dict_with_openai_extras_loads(tmp_path):
    """OpenAI's released weights are fp16 and carry three non-parameter keys."""
    model = _tiny()
    sd = {k: v.half() for k, v in model.state_dict().items()}
    sd.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "openai_fp16.pt"
    torch.save(sd, path)
    loaded = build_clip(str(path), image_size=TINY_SIZE)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for expected, got in zip(_outputs(model), _outputs(loaded), strict=True):
        assert (got - expected).abs().max() < 2e-2 * max(1.0, expected.abs().max().item())
        assert (got - expected).abs().max() > 0  # really went through fp16


def test_wrapped_state_dict_with_module_prefix_loads(tmp_path):
    model = _tiny()
    path = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "model": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    loaded = build_clip(str(path), image_size=TINY_SIZE)
    for expected, got in zip(_outputs(model), _outputs(loaded), strict=True):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_square_pretrained_grid_is_resized(tmp_path):
    model = _tiny(image_size=(64, 64))  # 4 x 4 grid, like OpenAI's square grids
    path = tmp_path / "square.pt"
    torch.save(model.state_dict(), path)
    loaded = build_clip(str(path), image_size=(96, 32), stride_size=16)
    assert loaded.visual.grid_size == (6, 2)
    expected = resize_pos_embed(model.visual.positional_embedding.detach(), (6, 2))
    torch.testing.assert_close(loaded.visual.positional_embedding.detach(), expected, atol=0, rtol=0)
    torch.testing.assert_close(loaded.visual.conv1.weight, model.visual.conv1.weight, atol=0, rtol=0)


def test_non_square_grid_of_other_size_fails(tmp_path):
    path = tmp_path / "irra_like.pt"
    torch.save(_tiny().state_dict(), path)  # 4 x 2 grid
    with pytest.raises(ValueError, match=r"8 patch positions.*\(6, 2\)"):
        build_clip(str(path), image_size=(96, 32))


def test_image_smaller_than_the_checkpoint_patch_names_the_config_key(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(_tiny().state_dict(), path)  # 16-pixel patches
    with pytest.raises(ConfigError, match=r"model\.clip\.image_size=\[8, 32\]: smaller than the 16-pixel patch of "
                                          r".*tiny\.pt"):
        build_clip(str(path), image_size=(8, 32))


def test_weights_of_another_shape_are_named_with_both_shapes(tmp_path):
    sd = _tiny().state_dict()
    sd["visual.ln_pre.weight"] = sd["visual.ln_pre.weight"][:64].clone()
    path = tmp_path / "wrong_shape.pt"
    torch.save(sd, path)
    with pytest.raises(IncompatibleWeightsError, match=r"wrong_shape\.pt: state dict does not match CLIP; shape "
                                                       r"mismatches \(1\): visual\.ln_pre\.weight \(64,\) vs model "
                                                       r"\(128,\)"):
        build_clip(str(path), image_size=TINY_SIZE)


def test_missing_and_unexpected_keys_are_reported(tmp_path):
    sd = _tiny().state_dict()
    del sd["ln_final.bias"]
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad_keys.pt"
    torch.save(sd, path)
    with pytest.raises(RuntimeError, match=r"missing keys: \['ln_final.bias'\]; unexpected keys: \['extra.weight'\]"):
        build_clip(str(path), image_size=TINY_SIZE)


def test_resnet_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "rn50.pt"
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(1), "visual.attnpool.c_proj.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="ResNet"):
        build_clip(str(path))


def test_foreign_file_is_rejected(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    with pytest.raises(RuntimeError, match="notes.txt"):
        build_clip(str(path))
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(RuntimeError, match="neither a TorchScript archive nor a state dict"):
        build_clip(str(path))


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"RN50x4.*ViT-B/16"):
        build_clip("RN50x4", cache_dir=str(tmp_path))


# ---------------------------------------------------------------- name resolution and download


@pytest.fixture
def offline(monkeypatch):
    """Any network access fails like an unreachable host."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_name_resolves_in_cache_dir_offline(tmp_path, offline):
    model = _tiny()
    torch.save(model.state_dict(), tmp_path / "ViT-B-16.pt")
    loaded = build_clip("ViT-B/16", image_size=TINY_SIZE, cache_dir=str(tmp_path))
    torch.testing.assert_close(_outputs(loaded), _outputs(model), atol=0, rtol=0)


def test_cache_env_var_is_the_default(tmp_path, offline, monkeypatch):
    torch.save(_tiny().state_dict(), tmp_path / "ViT-B-32.pt")
    monkeypatch.setenv("GADMS_CLIP_CACHE", str(tmp_path))
    assert clip_mod.resolve_clip_checkpoint("ViT-B/32") == str(tmp_path / "ViT-B-32.pt")


def test_missing_file_offline_gives_clear_error(tmp_path, offline):
    with pytest.raises(FileNotFoundError) as info:
        build_clip("ViT-B/16", cache_dir=str(tmp_path / "cache"))
    assert isinstance(info.value, UserInputError)  # the tools print it as one line
    message = str(info.value)
    assert str(tmp_path / "cache" / "ViT-B-16.pt") in message
    assert OPENAI_URLS["ViT-B/16"] in message
    assert os.listdir(tmp_path / "cache") == []


def _serve(monkeypatch, payload: bytes) -> None:
    def fake_urlopen(url, timeout=None):
        assert timeout is not None
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)


def test_corrupt_download_fails_sha_check_and_leaves_nothing(tmp_path, monkeypatch):
    _serve(monkeypatch, b"this is not the checkpoint")
    with pytest.raises(RuntimeError, match="SHA-256 mismatch") as info:
        build_clip("ViT-B/16", cache_dir=str(tmp_path))
    assert isinstance(info.value, UserInputError)
    assert os.listdir(tmp_path) == []


def test_verified_download_is_stored_and_loaded(tmp_path, monkeypatch):
    model = _tiny()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    payload = buffer.getvalue()
    sha = hashlib.sha256(payload).hexdigest()
    monkeypatch.setitem(OPENAI_URLS, "ViT-B/16", f"https://weights.invalid/clip/{sha}/ViT-B-16.pt")
    _serve(monkeypatch, payload)
    loaded = build_clip("ViT-B/16", image_size=TINY_SIZE, cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == ["ViT-B-16.pt"]
    assert (tmp_path / "ViT-B-16.pt").read_bytes() == payload
    torch.testing.assert_close(_outputs(loaded), _outputs(model), atol=0, rtol=0)


def test_openai_urls_carry_sha256():
    for name, url in OPENAI_URLS.items():
        assert len(url.split("/")[-2]) == 64, name
        assert url.endswith(".pt")


# ---------------------------------------------------------------- config builder


def _cfg(**overrides) -> EasyDict:
    base = dict(arch="tiny", pretrained="", image_size=[64, 32], stride_size=16, cache_dir="", grad_checkpointing=False)
    return EasyDict({**base, **overrides})


def test_build_from_config_random_and_pretrained(tmp_path):
    model = build_clip_from_config(_cfg(stride_size=12, grad_checkpointing=True))
    assert model.visual.grid_size == (5, 2) and model.grad_checkpointing
    assert model.visual.transformer.grad_checkpointing
    torch.save(model.state_dict(), tmp_path / "ViT-B-16.pt")
    loaded = build_clip_from_config(_cfg(pretrained="ViT-B/16", cache_dir=str(tmp_path), stride_size=12))
    torch.testing.assert_close(_outputs(loaded.eval()), _outputs(model.eval()), atol=0, rtol=0)
    with pytest.raises(ValueError, match="vision_width is 128 in the checkpoint but 768 in the preset"):
        build_clip_from_config(_cfg(arch="ViT-B/16", pretrained=str(tmp_path / "ViT-B-16.pt"), stride_size=12))
