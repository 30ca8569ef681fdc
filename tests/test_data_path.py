"""The training data path against a naive per-sample reference: pixels, token ids and masks per seed.

The reference is the path as IRRA / GA-DMS write it, one sample at a time: decode,
float transforms (resize, flip, pad + crop, ToTensor, Normalize, random erasing with
the CLIP mean), tokenise the caption, then draw the two masks with a per-sample
generator and apply them token by token. Whatever the loader does to be fast
(uint8 images normalised on the device, masks drawn per batch), what the model sees
must equal the reference: pixels after normalisation to 1e-6, ids and masks exactly.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from datasets.bases import open_image
from datasets.build import _sample_seed, build_train_loader, set_loader_epoch
from datasets.masking import MASK_ID, informative_probability, noise_probability
from datasets.score_cache import ScoreCache
from datasets.transforms import CLIP_MEAN, CLIP_STD, build_transforms
from datasets.webperson import WebPerson
from model.clip import CLIP, CLIP_PRESETS, normalize_images
from model.tokenizer import Tokenizer
from utils.config import load_config

SIZE = (32, 16)
TEXT_LENGTH = 20
WORDS = "a woman man wearing red black coat jeans bag shoes long hair café ✓ with and holding phone".split()


def _jpeg(i: int, size: tuple[int, int]) -> bytes:
    g = np.random.default_rng(i)
    pixels = g.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _caption(i: int) -> str:
    g = np.random.default_rng(1000 + i)
    # Some captions are longer than TEXT_LENGTH tokens (truncation), some short.
    return " ".join(WORDS[k] for k in g.integers(0, len(WORDS), 4 + 3 * (i % 7)))


def _write_shards(root, images: int = 10) -> None:
    folder = os.path.join(str(root), "WebPerson", "shards")
    os.makedirs(folder)
    with tarfile.open(os.path.join(folder, "shard-000000.tar"), "w") as tar:
        for i in range(images):
            # Sizes vary so the resize does real work (up and down).
            size = (12 + 4 * (i % 5), 28 + 6 * (i % 4))
            for name, data in ((f"{i:06d}.jpg", _jpeg(i, size)),
                               (f"{i:06d}.json", json.dumps({"caption1": _caption(2 * i),
                                                             "caption2": _caption(2 * i + 1)}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------- the naive reference


def reference_pixels(path: str, seed: int, aug: bool) -> torch.Tensor:
    """IRRA's float transform of one sample, with the sample's augmentation seed."""
    steps = [T.Resize(SIZE)]
    if aug:
        steps += [T.RandomHorizontalFlip(0.5), T.Pad(10), T.RandomCrop(SIZE)]
    steps += [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    if aug:
        steps.append(T.RandomErasing(scale=(0.02, 0.4), value=CLIP_MEAN))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed ^ 0x5DEECE66D)
        return T.Compose(steps)(Image.open(path).convert("RGB") if os.path.exists(path) else open_image(path))


def reference_mask(ids: torch.Tensor, prob: torch.Tensor, generator: torch.Generator, *, force_one: bool,
                   mask_ratio: float = 0.8, random_ratio: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style corruption, one token at a time, from three full-length draws."""
    length = ids.shape[0]
    select = torch.rand(length, generator=generator)
    action = torch.rand(length, generator=generator)
    random_ids = torch.randint(1, MASK_ID, (length,), generator=generator)
    new, labels = ids.clone(), torch.zeros_like(ids)
    for t in range(length):
        if 1 <= ids[t] < MASK_ID and select[t] < prob[t]:
            labels[t] = ids[t]
            if action[t] < mask_ratio:
                new[t] = MASK_ID
            elif action[t] < mask_ratio + random_ratio:
                new[t] = random_ids[t]
    if force_one and not labels.any() and 1 <= ids[1] < MASK_ID:
        labels[1], new[1] = ids[1], MASK_ID
    return new, labels


def reference_sample(index, i: int, *, epoch: int, seed: int, cfg, scores: torch.Tensor,
                     tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    pid, image_id, path, caption = index[i]
    sample_seed = _sample_seed(seed, epoch, i)
    ids = tokenizer.tokenize(caption, TEXT_LENGTH)[0]
    out = {"images": reference_pixels(path, sample_seed, cfg.data.img_aug), "pids": torch.tensor(pid),
           "image_ids": torch.tensor(image_id), "index": torch.tensor(i), "caption_ids": ids}
    m = cfg.masking
    generator = torch.Generator().manual_seed(sample_seed)
    if m.noise:
        prob = noise_probability(scores[i], max_prob=m.noise_max_prob, slope=m.noise_slope, center=m.noise_center)
        out["noise_ids"], _ = reference_mask(ids, prob, generator, force_one=m.noise_force_one)
    if m.mlm == "informative":
        prob = informative_probability(scores[i], max_prob=m.mlm_max_prob, slope=m.mlm_slope, center=m.mlm_center)
        out["mlm_ids"], out["mlm_labels"] = reference_mask(ids, prob, generator, force_one=True)
    elif m.mlm == "random":
        out["mlm_ids"], out["mlm_labels"] = reference_mask(ids, torch.full((TEXT_LENGTH,), m.random_prob),
                                                           generator, force_one=True)
    return out


# --------------------------------------------------------------------------- the loader against it


def _config(overrides: list[str]):
    return load_config(None, ["task=pretrain", "data.batch_size=4", "data.num_workers=0", "seed=7",
                              f"model.clip.image_size=[{SIZE[0]},{SIZE[1]}]", f"data.text_length={TEXT_LENGTH}",
                              *overrides])


def _setup(tmp_path, overrides: list[str], images: int = 10):
    _write_shards(tmp_path / "data", images)
    cfg = _config(overrides)
    index = WebPerson(str(tmp_path / "data"), cache=False).train
    cache = ScoreCache(tmp_path / "run", len(index), TEXT_LENGTH, refresh="step")  # masks read the live rows
    scores = torch.rand(len(index), TEXT_LENGTH, generator=torch.Generator().manual_seed(3))
    cache.update(torch.arange(len(index)), scores)
    return cfg, index, cache, scores


def _model_pixels(images: torch.Tensor) -> torch.Tensor:
    """What the image tower computes on before its first layer."""
    return images if images.is_floating_point() else normalize_images(images)


MASKINGS = {
    "gadms": ["masking.noise=true", "masking.mlm=informative", "masking.noise_force_one=false"],
    "released": ["masking.noise=true", "masking.mlm=informative", "masking.noise_force_one=true"],
    "irra": ["masking.noise=false", "masking.mlm=random"],
    "none": ["masking.noise=false", "masking.mlm=none"],
}


@pytest.mark.parametrize("masking", sorted(MASKINGS))
@pytest.mark.parametrize("aug", [True, False])
def test_loader_batches_equal_the_naive_per_sample_path(tmp_path, masking, aug):
    cfg, index, cache, scores = _setup(tmp_path, [f"data.img_aug={str(aug).lower()}", *MASKINGS[masking]])
    loader = build_train_loader(cfg, index, Tokenizer(), score_cache=cache)
    tokenizer = Tokenizer()
    erased = 0
    for epoch in (0, 1):
        set_loader_epoch(loader, epoch)
        for batch in loader:
            assert int(batch.pop("num_skipped")) == 0
            # The batch's host facts (datasets.build.add_host_facts), against a naive reading of the batch.
            rows = batch["caption_ids"].tolist()
            assert batch.pop("text_length") == max(row.index(Tokenizer.eot_id) for row in rows) + 1
            positions = batch.pop("mlm_positions", None)
            if "mlm_labels" in batch:
                labels = batch["mlm_labels"].tolist()
                assert positions.tolist() == [r * len(row) + c for r, row in enumerate(labels)
                                              for c, label in enumerate(row) if label != 0]
            else:
                assert positions is None
            pixels = _model_pixels(batch.pop("images"))
            for row, i in enumerate(batch["index"].tolist()):
                ref = reference_sample(index, i, epoch=epoch, seed=cfg.seed, cfg=cfg, scores=scores,
                                       tokenizer=tokenizer)
                torch.testing.assert_close(pixels[row], ref.pop("images"), rtol=0, atol=1e-6)
                assert set(batch) == set(ref), (set(batch), set(ref))
                for key, value in ref.items():
                    assert torch.equal(batch[key][row], value), (epoch, i, key)
                erased += int((pixels[row] == torch.tensor(CLIP_MEAN)[:, None, None]).all(0).sum() > 0)
    # Random erasing hit some samples (p = 0.5), so the erased pixels were compared too.
    assert (erased > 0) == aug


def test_workers_yield_the_batches_of_the_main_process(tmp_path):
    _, index, cache, _ = _setup(tmp_path, [], images=8)
    tokenizer = Tokenizer()
    batches = {}
    for workers in (0, 2):
        loader = build_train_loader(_config([f"data.num_workers={workers}"]), index, tokenizer, score_cache=cache)
        set_loader_epoch(loader, 1)
        batches[workers] = list(loader)
    assert len(batches[0]) == 4
    for a, b in zip(batches[0], batches[2], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


# --------------------------------------------------------------------------- the image tower's uint8 input


def _tiny_clip() -> CLIP:
    torch.manual_seed(0)
    return CLIP(**CLIP_PRESETS["tiny"], image_size=SIZE, stride_size=16).eval()


def test_image_tower_normalises_uint8_input_like_the_float_transform():
    model = _tiny_clip()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (3, 3, *SIZE), dtype=torch.uint8, generator=g)
    floats = torch.stack([T.Normalize(CLIP_MEAN, CLIP_STD)(T.ToTensor()(Image.fromarray(x.permute(1, 2, 0).numpy())))
                          for x in images])
    torch.testing.assert_close(normalize_images(images), floats, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), model.encode_image(floats), rtol=0, atol=1e-6)


def test_erase_flags_give_the_erasing_fill_after_normalisation():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, *SIZE), dtype=torch.uint8, generator=g)
    flags = torch.zeros(2, 1, *SIZE, dtype=torch.uint8)
    flags[0, 0, 3:9, 2:7] = 1
    expected = normalize_images(images)
    expected[0, :, 3:9, 2:7] = torch.tensor(CLIP_MEAN)[:, None, None]
    torch.testing.assert_close(normalize_images(torch.cat([images, flags], 1)), expected, rtol=0, atol=0)


def test_uint8_input_adds_no_state_dict_keys():
    model = _tiny_clip()
    reference = _tiny_clip()
    assert list(model.state_dict()) == list(reference.state_dict())
    assert not any("pixel" in k or "mean" in k for k in model.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)


def test_train_transform_output_is_uint8_and_eval_stays_float():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 20, 3), dtype=np.uint8))
    train = build_transforms(SIZE, is_train=True, aug=True, uint8=True)(image)
    assert train.dtype == torch.uint8 and train.shape == (4, *SIZE)  # RGB + erased-pixel flags
    plain = build_transforms(SIZE, is_train=True, aug=False, uint8=True)(image)
    assert plain.dtype == torch.uint8 and plain.shape == (3, *SIZE)
    evaluation = build_transforms(SIZE, is_train=False)(image)
    assert evaluation.dtype == torch.float32
    torch.testing.assert_close(normalize_images(plain[None])[0], evaluation, rtol=0, atol=1e-6)


def test_jpeg_draft_is_opt_in_and_keeps_at_least_the_target_size(tmp_path):
    path = tmp_path / "big.jpg"
    coarse = np.random.default_rng(0).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize((160, 320), Image.BICUBIC).save(path, "JPEG", quality=90)
    full = open_image(str(path))
    assert full.size == (160, 320)
    np.testing.assert_array_equal(np.asarray(open_image(str(path), None)), np.asarray(full))
    draft = open_image(str(path), draft_size=SIZE)
    # The smallest power-of-two scale that still covers (32, 16): 1/8 gives (20, 40).
    assert draft.size == (20, 40)
    resize = T.Resize(SIZE)
    a, b = (np.asarray(resize(x), dtype=np.float64) for x in (full, draft))
    assert 0 < np.abs(a - b).mean() < 4  # close to, but not the pixels of, the full decode: hence opt-in
