"""The checkpoint format: round trip, and every kind of bad file refused with CheckpointError."""
import os

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from fixtures import perturbed_model
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.model import LDDM

L, P, D = 16, 2, 4
# A real (two-word) tokenizer: load_checkpoint refuses an entry whose JSON does not load.
TOKENIZER = {"kind": "bpe", "json": Tokenizer(WordLevel({"a": 0, "b": 1}, unk_token="a")).to_str(),
             "vocab_size": 2}
TRAIN = {"steps": 3, "data": "sawtooth", "seed": 0, "final_losses": {"heldout_x": 0.6}}


def tiny_model(variant: str) -> LDDM:
    # adaLN-Zero heads start at zero; perturbed weights make the round trip compare real values.
    return perturbed_model(variant, 0.05, vocab_size=2, seq_len=L, n_latent=P, latent_dim=D)


def outputs(model: LDDM) -> list[torch.Tensor]:
    """Every network's outputs on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.cfg.total_vocab, (3, L), generator=g)
    y = torch.randn(3, P, D, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        if model.cfg.variant in ("mdlm", "ar"):
            return [model.denoiser(x, t)]
        if model.cfg.variant == "fuji":
            return [model.encoder(x), *model.denoiser(x, y, t)]
        return [model.encoder(x), model.latent_denoiser(y, t), model.token_denoiser(x, y, t)[0]]


@pytest.mark.parametrize("variant", ["mdlm", "fuji", "seq", "ar"])
def test_round_trip_gives_identical_outputs(tmp_path, variant):
    model = tiny_model(variant)
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, TOKENIZER, TRAIN)
    loaded, ckpt = load_checkpoint(path)
    assert loaded.cfg == model.cfg
    assert ckpt["tokenizer"] == TOKENIZER and ckpt["train"] == TRAIN
    for a, b in zip(outputs(model), outputs(loaded)):
        assert torch.equal(a, b)


@pytest.fixture
def good_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, tiny_model("mdlm"), None, TRAIN)
    return path


def test_truncated_file_is_refused(good_checkpoint):
    data = good_checkpoint.read_bytes()
    good_checkpoint.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(good_checkpoint)


class WritesAFile:
    """A pickle payload: unpickling it calls open(marker, "w"), which creates the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format": "lddm-checkpoint", "version": 1, "config": WritesAFile(marker)}, path)
    with pytest.raises(CheckpointError, match="weights-only load refuses"):
        load_checkpoint(path)
    assert not marker.exists()
    # The payload is live: an unsafe load runs it. This proves the refusal above is what
    # kept it from running.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_file_that_is_not_a_dict_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not an lddm checkpoint"):
        load_checkpoint(path)


def resave(path, **changes):
    ckpt = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            del ckpt[key]
        else:
            ckpt[key] = value
    torch.save(ckpt, path)


@pytest.mark.parametrize("changes,message", [
    ({"format": "something-else"}, "not an lddm checkpoint"),
    ({"version": 99}, "format version 99"),
    ({"state_dict": None}, r"lacks the keys \['state_dict'\]"),
    ({"tokenizer": None, "train": None}, r"lacks the keys \['tokenizer', 'train'\]"),
    ({"config": {"variant": "mdlm", "colour": "red"}}, "invalid config"),
    ({"config": {"variant": "diffusion-gpt"}}, "invalid config"),
])
def test_wrong_format_version_or_keys_are_refused(good_checkpoint, changes, message):
    resave(good_checkpoint, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(good_checkpoint)


def test_weights_that_do_not_match_the_config_are_refused(good_checkpoint):
    ckpt = torch.load(good_checkpoint, weights_only=True)
    ckpt["state_dict"].pop(next(iter(ckpt["state_dict"])))
    resave(good_checkpoint, state_dict=ckpt["state_dict"])
    with pytest.raises(CheckpointError, match="do not match its config"):
        load_checkpoint(good_checkpoint)


def test_nan_weights_are_refused(good_checkpoint):
    ckpt = torch.load(good_checkpoint, weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name][0] = float("nan")
    resave(good_checkpoint, state_dict=ckpt["state_dict"])
    with pytest.raises(CheckpointError, match="NaN or Inf weights"):
        load_checkpoint(good_checkpoint)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere.pt")


def test_save_is_atomic_and_leaves_no_temporary_files(good_checkpoint):
    assert sorted(os.listdir(good_checkpoint.parent)) == ["model.pt"]
