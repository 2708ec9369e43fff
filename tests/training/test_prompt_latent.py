"""The prompt-aware SEQ latent denoiser (config.prompt_latent): its random training clamps, its
token input, the latent-only stage and `lddm-train --latent-from`."""
import dataclasses

import pytest
import torch

import fixtures
from training.checkpoint import CheckpointError, load_checkpoint
from training.cli import main as cli_main
from training.config import ConfigError
from training.data import SawtoothData, sample_sawtooth
from training.losses import LATENT_ONLY, LossOptions, compute_loss, random_clamps
from training.model import LDDM
from training.trainer import TrainConfig, train

L = 16
MASK = 2


def tiny_config(**overrides):
    return fixtures.tiny_config("seq", vocab_size=2, seq_len=L, **overrides)


def clamp_kind(row: torch.Tensor) -> str:
    """none, prefix, hole (everything but one span) or scattered: the kinds random_clamps draws."""
    clamped = (row != MASK).tolist()
    changes = sum(a != b for a, b in zip(clamped, clamped[1:]))
    if not any(clamped):
        return "none"
    if clamped[0] and changes == 1:
        return "prefix"
    if changes == 2 and clamped[0] and clamped[-1] or changes == 1 and not clamped[0]:
        return "hole"
    return "scattered"


def test_random_clamps_keep_x0_where_clamped_and_draw_each_kind():
    x0 = sample_sawtooth(2000, L, torch.Generator().manual_seed(0))
    clamped = random_clamps(x0, MASK, torch.Generator().manual_seed(1))
    kept = clamped != MASK
    assert torch.equal(clamped[kept], x0[kept])
    kinds = [clamp_kind(row) for row in clamped]
    shares = {kind: kinds.count(kind) / len(kinds) for kind in ("none", "prefix", "hole", "scattered")}
    # a quarter each, but a scattered draw may look like another kind, a short prefix like a hole
    assert all(0.15 < share < 0.4 for share in shares.values()), shares


def perturbed(model: LDDM) -> LDDM:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_a_prompt_aware_latent_denoiser_reads_the_clamped_tokens():
    model = perturbed(LDDM(tiny_config(prompt_latent=True)))
    y, t = torch.randn(3, 2, 4), torch.full((3,), 0.5)
    unprompted = torch.full((3, L), MASK)
    prompted = unprompted.clone()
    prompted[:, :4] = 1
    with torch.no_grad():
        assert not torch.allclose(model.latent_denoiser(y, t, prompted), model.latent_denoiser(y, t, unprompted))
    plain = perturbed(LDDM(tiny_config()))
    with torch.no_grad():   # the plain one has no token input
        assert torch.equal(plain.latent_denoiser(y, t, prompted), plain.latent_denoiser(y, t))


def grads_by_network(model: LDDM, stage: int):
    """(network -> whether the loss of `stage` gave it a gradient, the loss terms)."""
    model.zero_grad()
    x0 = sample_sawtooth(8, L, torch.Generator().manual_seed(0))
    terms = compute_loss(model, x0, torch.Generator().manual_seed(0), stage, 1.0, LossOptions())
    terms.total.backward()
    return {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
            for name, net in model.named_children()}, terms


def test_the_latent_only_stage_trains_the_prompt_aware_latent_denoiser_alone():
    model = perturbed(LDDM(tiny_config(prompt_latent=True))).train()
    trained, terms = grads_by_network(model, LATENT_ONLY)
    assert trained == {"encoder": False, "latent_denoiser": True, "token_denoiser": False}
    assert terms.loss_x != terms.loss_x and terms.total.item() == terms.loss_y   # L_x is not computed
    assert model.latent_denoiser.embed.weight.grad.abs().sum() > 0   # the token stream is trained


def run_config(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(max_steps=4, batch_size=8, warmup=2, eval_every=2, eval_batches=1,
                                           device="cpu"), **changes)


@pytest.fixture(scope="module")
def trained_seq(tmp_path_factory):
    out = tmp_path_factory.mktemp("seq") / "seq.pt"
    train(tiny_config(), run_config(), SawtoothData(L), out, progress=False, log=lambda line: None)
    return out


def test_latent_from_keeps_the_trained_networks_and_trains_a_new_latent_denoiser(trained_seq, tmp_path):
    out = tmp_path / "prompt.pt"
    info = train(tiny_config(prompt_latent=True), run_config(latent_from=str(trained_seq)), SawtoothData(L), out,
                 progress=False, log=lambda line: None)
    source, model = load_checkpoint(trained_seq)[0], load_checkpoint(out)[0]
    assert model.cfg.prompt_latent
    for network in ("encoder", "token_denoiser"):
        theirs = getattr(source, network).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(model, network).state_dict().items()), network
    fresh = LDDM(tiny_config(prompt_latent=True)).latent_denoiser.state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in model.latent_denoiser.state_dict().items())
    assert [sorted(record) for record in info["history"]] == [["heldout_x", "heldout_y", "step", "train_y"]] * 2


def test_latent_from_refuses_another_variant_model_or_tokenizer(trained_seq, tmp_path):
    with pytest.raises(ConfigError, match="only seq models have, not mdlm; pass --variant seq"):
        train(fixtures.tiny_config("mdlm", vocab_size=2, seq_len=L), run_config(latent_from=str(trained_seq)),
              SawtoothData(L), tmp_path / "m.pt", progress=False)
    with pytest.raises(CheckpointError, match=r"holds another model \(its config differs in \['width'\]\)"):
        train(tiny_config(prompt_latent=True, width=64), run_config(latent_from=str(trained_seq)), SawtoothData(L),
              tmp_path / "m.pt", progress=False)
    other_data = SawtoothData(L)
    other_data.tokenizer = fixtures.tiny_tokenizer_entry()   # the checkpoint has none
    with pytest.raises(CheckpointError, match="was trained with another tokenizer than --data sawtooth gives"):
        train(tiny_config(prompt_latent=True), run_config(latent_from=str(trained_seq)), other_data,
              tmp_path / "m.pt", progress=False)


@pytest.mark.parametrize("flags,expected", [
    (["--variant", "fuji", "--prompt-latent"], "prompt_latent applies to seq models only, not to fuji"),
    (["--variant", "seq", "--latent-from", "/no/such/model.pt"], "does not exist"),
])
def test_cli_refuses_prompt_latent_options_in_one_sentence(tmp_path, capsys, flags, expected):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*flags, "--max-steps", "1", "--preset", "tiny", "--seq-len", str(L), "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and expected in err and len(err.splitlines()) == 1
