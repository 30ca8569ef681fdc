"""The retrieval model: losses, gradients, reference state-dict layout, checkpoint loading."""

import os
import pickle
import random
import zipfile

import pytest
import torch

from model.build import build_model
from model.weights import IncompatibleWeightsError, load_model_weights, load_pretrained
from utils.checkpoint import CheckpointNotFoundError, CheckpointReadError, read_checkpoint
from utils.config import load_config
from utils.errors import UserInputError

SOT, EOT, MASK = 49406, 49407, 49405
TINY = ["model.clip.arch=tiny", "model.clip.pretrained=", "model.clip.image_size=[64, 32]",
        "gass.num_layers=2", "model.cmt_depth=1"]


def tiny_cfg(*extra):
    return load_config(None, TINY + list(extra))


def make_batch(batch=4, num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    for b in range(batch):
        n = 4 + b
        ids[b, 0] = SOT
        ids[b, 1:n + 1] = torch.randint(1, MASK, (n,), generator=g)
        ids[b, n + 1] = EOT
    mlm_ids, labels = ids.clone(), torch.zeros_like(ids)
    labels[:, 1] = ids[:, 1]
    mlm_ids[:, 1] = MASK
    return {
        "images": torch.randn(batch, 3, 64, 32, generator=g),
        "pids": torch.arange(batch) % num_classes,
        "caption_ids": ids,
        "noise_ids": ids.clone(),
        "mlm_ids": mlm_ids,
        "mlm_labels": labels,
    }


def test_forward_returns_weighted_losses_and_scores():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("model.loss_names=sdm+id+mlm", "model.loss_weights.mlm=0.5"), num_classes=3)
    model.train()
    losses, metrics, aux = model(make_batch())
    # Losses, scalar metrics and auxiliary tensors come in separate mappings.
    assert list(losses) == ["sdm_loss", "id_loss", "mlm_loss"]
    assert set(metrics) == {"mlm_acc", "img_acc", "txt_acc"} and all(v.dim() == 0 for v in metrics.values())
    assert set(aux) == {"gass_scores"}
    assert aux["gass_scores"].shape == (4, 77) and not aux["gass_scores"].requires_grad
    assert all(v.requires_grad and v.dim() == 0 for v in losses.values())
    # The weight is applied inside the model: compare with weight 1.
    torch.manual_seed(0)
    unweighted = build_model(tiny_cfg("model.loss_names=sdm+id+mlm", "model.loss_weights.mlm=1.0"), num_classes=3)
    unweighted.train()
    assert torch.allclose(losses["mlm_loss"], 0.5 * unweighted(make_batch()).losses["mlm_loss"])
    model.eval()
    assert model(make_batch()).aux == {}


def test_every_trainable_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("model.loss_names=sdm+id+mlm"), num_classes=3).train()
    sum(model(make_batch()).losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad, no_grad


def test_encoders_give_embed_dim_features():
    model = build_model(tiny_cfg(), num_classes=0).eval()
    batch = make_batch()
    assert model.encode_image(batch["images"]).shape == (4, 64)
    assert model.encode_text(batch["caption_ids"]).shape == (4, 64)


def test_pretrain_to_finetune_reports_exactly_the_classifier(tmp_path):
    pretrained = build_model(tiny_cfg("model.loss_names=sdm+mlm"), num_classes=0)
    wrapped = {"model": {"module." + k: v for k, v in pretrained.state_dict().items()}, "epoch": 3}
    path = tmp_path / "pretrain.pth"
    torch.save(wrapped, path)
    finetune = build_model(tiny_cfg("model.loss_names=sdm+id+mlm"), num_classes=7)
    report = load_pretrained(finetune, path)
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"]
    assert report.unexpected == []
    assert torch.equal(finetune.state_dict()["mlm_head.fc.weight"], pretrained.state_dict()["mlm_head.fc.weight"])
    with pytest.raises(IncompatibleWeightsError, match="classifier"):
        load_pretrained(finetune, path, allowed_missing=())


def test_partial_checkpoint_is_refused_readably(tmp_path):
    model = build_model(tiny_cfg("model.loss_names=sdm+mlm"), num_classes=0)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("base_model.visual.")}
    state["extra.head.weight"] = torch.zeros(2)
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(IncompatibleWeightsError) as exc:
        load_pretrained(model, path)
    msg = str(exc.value)
    assert "base_model.visual.*" in msg and "extra.head.weight" in msg and str(path) in msg


def test_classifier_shape_mismatch_counts_as_missing(tmp_path):
    src = build_model(tiny_cfg("model.loss_names=sdm+id"), num_classes=4)
    dst = build_model(tiny_cfg("model.loss_names=sdm+id"), num_classes=6)
    report = load_model_weights(dst, src.state_dict(), allowed_missing=("classifier.",))
    assert sorted(report.missing) == ["classifier.bias", "classifier.weight"]
    assert len(report.shape_mismatch) == 2


class _Arbitrary:
    def __init__(self):
        self.x = 1


def test_untrusted_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": _Arbitrary()}, path)
    with pytest.raises(RuntimeError, match="trust"):
        read_checkpoint(path)
    assert isinstance(read_checkpoint(path, trust=True)["obj"], _Arbitrary)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "missing.pth")


class _RunsCommand:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _zip_without_torch_records(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")


@pytest.mark.parametrize("trust", [False, True])
@pytest.mark.parametrize("write, what", [
    (lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "(unrecognised content starting with b'"),
    (lambda p: p.write_bytes(b""), "(the file is empty)"),
    (lambda p: p.write_text("model weights: see the README\n"), "(it is text, starting 'model weights: see"),
    (_zip_without_torch_records, "(a zip archive without the data.pkl record of torch.save, holding notes.txt)"),
    (lambda p: p.write_bytes(pickle.dumps({"w": [1.0]})), "(a Python pickle, but not in torch.save's format)"),
])
def test_a_file_that_is_no_checkpoint_says_so(tmp_path, write, what, trust):
    path = tmp_path / "model.pth"
    write(path)
    with pytest.raises(CheckpointReadError) as info:
        read_checkpoint(path, trust=trust)
    msg = str(info.value)
    assert msg.startswith(f"{path} is not a PyTorch checkpoint {what}") and "trust" not in msg
    assert isinstance(info.value, UserInputError) and isinstance(info.value, RuntimeError)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_checkpoint_is_corrupt_not_untrusted(tmp_path, legacy):
    whole = tmp_path / "whole.pth"
    torch.save({"model": build_model(tiny_cfg(), num_classes=0).state_dict()}, whole,
               _use_new_zipfile_serialization=not legacy)
    assert "model" in read_checkpoint(whole)
    data = whole.read_bytes()
    for cut in (len(data) // 2, 100, len(data) - 10):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointReadError) as info:
            read_checkpoint(path, trust=True)
        assert str(info.value).startswith(f"cannot read checkpoint {path}: truncated or corrupt ("), cut


def test_malicious_pickle_never_runs_without_trust(tmp_path):
    marker = tmp_path / "pwned"
    evil = _RunsCommand(f"touch {marker}")
    bare = tmp_path / "bare.pth"
    bare.write_bytes(pickle.dumps(evil))
    for trust in (False, True):  # a bare pickle is no checkpoint: never unpickled, even when trusted
        with pytest.raises(CheckpointReadError, match="is not a PyTorch checkpoint"):
            read_checkpoint(bare, trust=trust)
    saved = tmp_path / "saved.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": evil}, saved)
    with pytest.raises(CheckpointReadError) as info:
        read_checkpoint(saved)
    msg = str(info.value)
    assert msg.startswith(f"{saved} contains objects that need arbitrary unpickling")
    assert "train.trust_checkpoints=true" in msg and "system" in msg
    assert not marker.exists()


def test_missing_checkpoint_is_a_user_error_and_file_not_found(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="checkpoint not found") as info:
        read_checkpoint(tmp_path / "missing.pth")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, UserInputError)
    with pytest.raises(CheckpointNotFoundError, match="is a directory"):
        read_checkpoint(tmp_path)


def test_text_features_ignore_trailing_padding():
    model = build_model(tiny_cfg(), num_classes=0).eval()
    ids = make_batch()["caption_ids"]
    with torch.no_grad():
        ours = model.encode_text(ids)
        full = model.base_model.encode_text(ids)[torch.arange(4), ids.argmax(-1)]
    torch.testing.assert_close(ours, full, atol=1e-5, rtol=1e-5)


def test_gass_deeper_than_the_text_tower_is_a_config_error():
    from utils.config import ConfigError

    with pytest.raises(ConfigError, match=r"gass.num_layers=5: must be an integer in \[1, 4\]"):
        build_model(tiny_cfg("gass.num_layers=5"), num_classes=0)
    assert build_model(tiny_cfg("gass.num_layers=4"), num_classes=0).gass_layers == 4


def test_compiled_towers_keep_the_numbers_and_the_state_dict_layout():
    """train.compile: both towers compiled in place (dynamo's graph capture; the eager backend keeps the test
    fast — the default, inductor, takes minutes on this CPU), same losses and GASS scores, same keys."""
    torch.manual_seed(0)
    eager = build_model(tiny_cfg("model.loss_names=sdm+mlm"), num_classes=0).train()
    torch.manual_seed(0)
    compiled = build_model(tiny_cfg("model.loss_names=sdm+mlm"), num_classes=0).train()
    compiled.base_model.compile_towers(backend="eager")
    assert compiled.base_model.visual._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(eager.state_dict())
    batch = make_batch()
    expected, got = eager(batch), compiled(batch)
    for name in expected.losses:
        torch.testing.assert_close(got.losses[name], expected.losses[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.aux["gass_scores"], expected.aux["gass_scores"], rtol=1e-4, atol=1e-5)
    with pytest.raises(AttributeError):
        compiled.base_model.visual._orig_mod  # noqa: B018 - compiled in place, not wrapped
