"""The training loop: AdamW with linear warmup, EMA, gradient clipping, bf16 autocast on CUDA,
two-stage training for the latent variants, periodic held-out evaluation, resumable runs.

Stages (fuji, seq): the first round(stage1_frac * max_steps) steps train the encoder and the
token denoiser through L_x only; afterwards the encoder is frozen and both losses train, with
lambda_y ramped from the start of stage 2. stage1_frac = 0 is single-stage joint training
(the encoder stays trainable, L_y on from step 0). mdlm and ar have one stage. A SEQ run with
latent_from starts from a trained SEQ checkpoint's encoder and token denoiser, both frozen, and
trains a new latent denoiser alone (losses.LATENT_ONLY): how a model gets a prompt-aware one.

Resuming: a resume file beside the output (`<out>.resume.pt`) holds the weights, the EMA, the
optimizer, the step and the random state; it is rewritten at every evaluation and at the end.
A resumed run draws the same batches as an uninterrupted one; max_steps may be raised. Ctrl-C
(or SIGTERM) raises Interrupted, whose message names the resume file that holds the run and its
step, or says that this run has written none yet (before its first evaluation).

Both files are written through runtimes.fileio.write_atomic: a kill mid-write leaves the
previous file, never half of one.

Under torchrun (training/distributed.py) the run is data-parallel: --batch-size is the global
batch, split evenly over the ranks; each rank draws its share from its own generator; the loss
runs inside DistributedDataParallel, which averages the gradients, so every rank holds the same
weights, EMA and optimiser state; rank 0 evaluates and writes both files. A resume file written
by any world size continues under any other: the weights and optimiser come from the file, and
each rank's generator is re-derived from the seed, its rank and the step (so a resumed
distributed run draws other batches than an uninterrupted one would, equally random).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtimes.fileio import WriteError, check_input_file, check_target, write_atomic
from runtimes.progress import progress as show_progress
from training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from training.config import ConfigError, ModelConfig
from training.data import HELDOUT_SEED
from training.distributed import Dist
from training.losses import LATENT_ONLY, WEIGHTINGS, LossOptions, LossTerms, compute_loss, lambda_y_at
from training.model import LDDM

RESUME_FORMAT = "lddm-resume"
RESUME_VERSION = 1
# Options that may differ between the run that wrote a resume file and the run that resumes it.
RESUMABLE_CHANGES = ("max_steps", "eval_every", "device")


@dataclass(frozen=True)
class TrainConfig:
    data: str = "sawtooth"
    max_steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    ema: float = 0.999              # 0 turns EMA off; otherwise the EMA weights are saved
    grad_clip: float = 1.0          # 0 turns clipping off
    seed: int = 0
    stage1_frac: float = 0.5        # fuji, seq: fraction of steps in stage 1
    lambda_y: float = 1.0
    lambda_y_warmup: int = 0        # steps of the linear ramp of lambda_y (from stage 2's start)
    lambda_y_delay: int = 0         # steps at lambda_y = 0 before the ramp ("delayed warmup")
    p_cfg: float = 0.0
    token_weighting: str = "elbo"
    latent_weighting: str = "constant"
    eval_every: int = 200
    eval_batches: int = 4
    tokenizer: str = "bpe"          # text data: "bpe" (trained on the corpus) or "bert"
    text_vocab: int = 512           # text data, bpe: vocabulary size
    device: str = "auto"
    latent_from: str | None = None  # seq: a trained seq checkpoint whose encoder and token denoiser are kept

    def __post_init__(self):
        checks = [
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0.0 <= self.ema < 1.0, f"ema must be in [0, 1), got {self.ema}"),
            (0.0 <= self.stage1_frac < 1.0, f"stage1_frac must be in [0, 1), got {self.stage1_frac}"),
            (0.0 <= self.p_cfg < 1.0, f"p_cfg must be in [0, 1), got {self.p_cfg}"),
            (self.token_weighting in WEIGHTINGS and self.latent_weighting in WEIGHTINGS,
             f"loss weightings must be one of {WEIGHTINGS}, got {self.token_weighting!r}, {self.latent_weighting!r}"),
            (self.eval_every >= 1 and self.eval_batches >= 1,
             f"eval_every and eval_batches must be >= 1, got {self.eval_every}, {self.eval_batches}"),
            (self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resume_path(out: str | Path) -> Path:
    """Where the resume file of a run writing `out` lives: `<out>.resume.pt`."""
    out = Path(out)
    return out.with_name(out.name + ".resume.pt")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during train(); the message says which resume file holds the run, if any."""


def check_out_path(out: str | Path) -> Path:
    """Refuse an output path that cannot be written before any time is spent training.

    Raises:
        ConfigError: the refusals of runtimes.fileio.check_target, for --out and its resume file.
    """
    try:
        out = check_target(out, "--out")
        check_target(resume_path(out), "the resume file of --out")
        return out
    except WriteError as e:
        raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------- pieces of the loop

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then constant (MDLM's schedule)."""
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def stage1_steps(model_cfg: ModelConfig, cfg: TrainConfig) -> int:
    return round(cfg.stage1_frac * cfg.max_steps) if model_cfg.has_latent and cfg.latent_from is None else 0


def adopt_trained_networks(run: "Run", path: str, data) -> None:
    """latent_from: copy a trained SEQ checkpoint's encoder and token denoiser into the run's model
    (and its EMA). The checkpoint must be of this model's config but for prompt_latent, and of
    the same tokenizer.

    Raises:
        ConfigError: the model is not seq.
        CheckpointError: the checkpoint is unreadable, or another model's or another data's.
    """
    mine = run.model.cfg
    if mine.variant != "seq":
        raise ConfigError(f"--latent-from trains a new latent denoiser, which only seq models have, not "
                          f"{mine.variant}; pass --variant seq")
    trained, ckpt = load_checkpoint(path)
    if trained.cfg != dataclasses.replace(mine, prompt_latent=trained.cfg.prompt_latent):
        mine_dict, theirs = mine.to_dict(), trained.cfg.to_dict()
        diff = sorted(k for k in mine_dict if k != "prompt_latent" and mine_dict[k] != theirs[k])
        raise CheckpointError(f"--latent-from {path} holds another model (its config differs in {diff}); pass the "
                              f"--variant, --preset, sizes and data of the run that wrote it")
    if ckpt["tokenizer"] != data.tokenizer:
        raise CheckpointError(f"--latent-from {path} was trained with another tokenizer than --data {data.name} "
                              f"gives; pass the data and tokenizer options of the run that wrote it")
    for model in (run.model, run.ema_model):
        if model is not None:
            model.encoder.load_state_dict(trained.encoder.state_dict())
            model.token_denoiser.load_state_dict(trained.token_denoiser.state_dict())


@torch.no_grad()
def update_ema(ema_model: LDDM, model: LDDM, step: int, decay: float) -> None:
    # Warm the decay up, so that short runs are not dominated by the random initialisation.
    d = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema_model.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - d)


@torch.no_grad()
def evaluate(model: LDDM, batches: list[torch.Tensor], device: torch.device, lambda_y: float,
             opts: LossOptions) -> dict[str, float]:
    """Held-out loss with fixed draws (same t, masks and noise at every evaluation)."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    eval_opts = dataclasses.replace(opts, p_cfg=0.0)
    xs, ys = [], []
    for x0 in batches:
        terms = compute_loss(model, x0.to(device), g, stage=2, lambda_y=lambda_y, opts=eval_opts)
        xs.append(terms.loss_x)
        ys.append(terms.loss_y)
    model.train(was_training)
    return {"heldout_x": sum(xs) / len(xs), "heldout_y": sum(ys) / len(ys)}


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------- resume files

def save_resume(path: Path, state: dict) -> None:
    state = {"format": RESUME_FORMAT, "version": RESUME_VERSION, **state}
    write_atomic(path, lambda f: torch.save(state, f), "the resume file")


def load_resume(path: str | Path, model_cfg: ModelConfig, cfg: TrainConfig) -> dict:
    """Read a resume file and check that it continues the run described by model_cfg and cfg."""
    path = check_input_file(path, "--resume", "pass the <out>.resume.pt written by an earlier run", CheckpointError)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is one user-facing sentence, never a traceback
        raise CheckpointError(f"--resume {path} cannot be read ({type(e).__name__}); "
                              f"it is not a resume file written by lddm-train") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT or state.get("version") != RESUME_VERSION:
        raise CheckpointError(f"--resume {path} is not an lddm-train resume file (version {RESUME_VERSION}); "
                              f"pass the <out>.resume.pt written by an earlier run")
    if state["model_config"] != model_cfg.to_dict():
        diff = sorted(k for k, v in model_cfg.to_dict().items() if state["model_config"].get(k) != v)
        raise CheckpointError(f"--resume {path} was written for another model (differs in {diff}); "
                              f"pass the same --variant, --preset and sizes as the run that wrote it")
    new = cfg.to_dict()
    diff = sorted(k for k, v in state["train_config"].items() if k not in RESUMABLE_CHANGES and new.get(k) != v)
    if diff:
        raise CheckpointError(f"--resume {path} was written with other training options ({diff}); "
                              f"only {list(RESUMABLE_CHANGES)} may change when resuming")
    if state["step"] > cfg.max_steps:
        raise CheckpointError(f"--resume {path} is at step {state['step']}, past --max-steps {cfg.max_steps}; "
                              f"raise --max-steps")
    return state


def interrupt_note(step: int, saved: tuple[Path, int] | None, cfg: TrainConfig) -> str:
    """What an interrupted run left: the resume file that holds it, or that there is none."""
    if saved is None:
        return (f"interrupted at step {step}, before the first evaluation (step {min(cfg.eval_every, cfg.max_steps)}); "
                f"this run wrote no resume file, so it has to start again")
    path, at = saved
    return f"interrupted at step {step}; the resume file {path} holds step {at}: continue with --resume {path}"


# ----------------------------------------------------------------------------- the steps of a run

@dataclass
class Run:
    """What a run carries from step to step; a resume file holds its snapshot()."""
    model: LDDM
    ema_model: LDDM | None
    opt: torch.optim.Optimizer
    gen: torch.Generator          # draws every batch, time and mask of training, in order
    step: int = 0
    elapsed: float = 0.0          # seconds spent by the runs that this one continues
    history: list[dict] = field(default_factory=list)  # one record per evaluation
    recent: list[tuple[float, float]] = field(default_factory=list)  # the last 100 (loss_x, loss_y)
    saved: tuple[Path, int] | None = None  # (resume file, its step): where the run can be continued from
    started: float = field(default_factory=time.time)
    ddp: tuple[int, torch.nn.Module] | None = None  # (stage, the DDP-wrapped LossModule) of a distributed run

    @property
    def kept_model(self) -> LDDM:
        """The weights that are evaluated and saved: the EMA's when EMA is on."""
        return self.model if self.ema_model is None else self.ema_model

    def seconds(self) -> float:
        return self.elapsed + time.time() - self.started


def start_run(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device) -> Run:
    """A fresh run: the model initialised from cfg.seed, its EMA copy, the optimiser, the generator."""
    torch.manual_seed(cfg.seed)
    model = LDDM(model_cfg).to(device).train()
    ema_model = copy.deepcopy(model).requires_grad_(False) if cfg.ema > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    return Run(model, ema_model, opt, torch.Generator().manual_seed(cfg.seed))


def resume_run(run: Run, path: str | Path, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """Continue `run` from a resume file: weights, EMA, optimiser, generator state, step and records."""
    state = load_resume(path, model_cfg, cfg)
    run.model.load_state_dict(state["model"])
    if run.ema_model is not None:
        run.ema_model.load_state_dict(state["ema"])
    run.opt.load_state_dict(state["optimizer"])
    run.gen.set_state(state["generator"])
    run.step, run.elapsed, run.history, run.recent = state["step"], state["elapsed"], state["history"], state["recent"]
    run.saved = (Path(path), run.step)


def snapshot(run: Run, model_cfg: ModelConfig, cfg: TrainConfig) -> dict:
    """The resume file's content (load_resume reads it back)."""
    return {"model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(), "step": run.step,
            "model": run.model.state_dict(), "ema": None if run.ema_model is None else run.ema_model.state_dict(),
            "optimizer": run.opt.state_dict(), "generator": run.gen.get_state(),
            "elapsed": run.seconds(), "history": run.history, "recent": run.recent}


class LossModule(torch.nn.Module):
    """compute_loss as a module's forward, the call DistributedDataParallel wraps."""

    def __init__(self, model: LDDM):
        super().__init__()
        self.model = model

    def forward(self, x0, generator, stage, lambda_y, opts):
        terms = compute_loss(self.model, x0, generator, stage, lambda_y, opts)
        return terms.total, terms.loss_x, terms.loss_y


def distributed_loss(run: Run, stage: int) -> torch.nn.Module:
    """The DDP-wrapped loss of this stage. Wrapped anew when the stage changes: DDP registers the
    parameters that need gradients when it is built, and stage 2 freezes the encoder. The latent
    variants leave parameters unused in stage 1 (FUJI's latent head, SEQ's latent denoiser), which
    DDP then looks for at each step."""
    from torch.nn.parallel import DistributedDataParallel

    if run.ddp is None or run.ddp[0] != stage:
        module = DistributedDataParallel(LossModule(run.model), find_unused_parameters=run.model.cfg.has_latent)
        run.ddp = (stage, module)
    return run.ddp[1]


def enter_stage(run: Run, n_stage1: int, latent_only: bool = False) -> int:
    """The stage of run.step (1 or 2, or LATENT_ONLY), with the encoder trainable in stage 1 only.

    At the first step of stage 2 the running train losses restart (the loss changes), and the
    EMA's encoder becomes the frozen one: it defines the latents of stage 2, so the saved
    encoder must be it. LATENT_ONLY freezes the encoder and the token denoiser throughout.
    """
    if latent_only:
        run.model.encoder.requires_grad_(False)
        run.model.token_denoiser.requires_grad_(False)
        return LATENT_ONLY
    stage = 1 if run.step < n_stage1 else 2
    if n_stage1 > 0:
        run.model.encoder.requires_grad_(stage == 1)
        if run.step == n_stage1:
            run.recent = []
            if run.ema_model is not None:
                run.ema_model.encoder.load_state_dict(run.model.encoder.state_dict())
    return stage


def lambda_y_for(step: int, n_stage1: int, cfg: TrainConfig) -> float:
    """lambda_y at `step`: its ramp starts with stage 2."""
    return lambda_y_at(step - n_stage1, cfg.lambda_y, cfg.lambda_y_warmup, cfg.lambda_y_delay)


def train_step(run: Run, data, device: torch.device, cfg: TrainConfig, stage: int, lambda_y: float,
               opts: LossOptions, dist: Dist | None = None):
    """One optimiser step on one batch (this rank's share of it); returns the loss terms
    (losses.LossTerms, this rank's)."""
    for group in run.opt.param_groups:
        group["lr"] = lr_at(run.step, cfg)
    x0 = data.train_batch(cfg.batch_size // (dist.world if dist else 1), run.gen).to(device)
    with autocast(device):
        if dist is None:
            terms = compute_loss(run.model, x0, run.gen, stage, lambda_y, opts)
        else:
            terms = LossTerms(*distributed_loss(run, stage)(x0, run.gen, stage, lambda_y, opts))
    if not math.isfinite(terms.total.item()):
        raise ConfigError(f"the loss became {terms.total.item()} at step {run.step}; lower --lr or raise --warmup")
    run.opt.zero_grad(set_to_none=True)
    terms.total.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.opt.step()
    if run.ema_model is not None:
        update_ema(run.ema_model, run.model, run.step, cfg.ema)
    run.step += 1
    run.recent = (run.recent + [(terms.loss_x, terms.loss_y)])[-100:]
    return terms


def loss_fields(terms, stage: int, n_stage1: int, has_latent: bool) -> dict[str, str]:
    """The progress bar's fields: the stage where there are two, loss_y where there is a latent."""
    fields = {"stage": str(stage)} if n_stage1 else {}
    if stage != LATENT_ONLY:
        fields["loss_x"] = f"{terms.loss_x:.4f}"
    if has_latent:
        fields["loss_y"] = f"{terms.loss_y:.4f}"
    return fields


def evaluation_record(run: Run, heldout: list[torch.Tensor], device: torch.device, cfg: TrainConfig,
                      opts: LossOptions, has_latent: bool) -> dict[str, float]:
    """The history entry of this step: the mean recent train losses and the held-out losses."""
    ev = evaluate(run.kept_model, heldout, device, cfg.lambda_y, opts)
    record = {"step": run.step}
    if cfg.latent_from is None:   # a latent-only run does not compute L_x while training
        record["train_x"] = sum(r[0] for r in run.recent) / len(run.recent)
    record["heldout_x"] = ev["heldout_x"]
    if has_latent:
        record.update(train_y=sum(r[1] for r in run.recent) / len(run.recent), heldout_y=ev["heldout_y"])
    return record


def evaluation_line(record: dict, stage: int, n_stage1: int, seconds: float) -> str:
    """e.g. "step 200: stage 2 train_x 0.4123 heldout_x 0.4301 ... (35 s)"."""
    stage_note = [f"stage {stage}"] if n_stage1 else []
    return " ".join([f"step {record['step']}:", *stage_note,
                     *(f"{k} {v:.4f}" for k, v in record.items() if k != "step"), f"({seconds:.0f} s)"])


def print_line(line: str) -> None:
    print(line, flush=True)


def write_resume(run: Run, out: Path, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    save_resume(resume_path(out), snapshot(run, model_cfg, cfg))
    run.saved = (resume_path(out), run.step)


def write_checkpoint(run: Run, out: Path, data, cfg: TrainConfig, dist: Dist | None = None) -> dict:
    """Save the kept model with its provenance (rank 0 of a distributed run); returns the
    checkpoint's "train" entry."""
    final = run.history[-1] if run.history else {}
    info = {"steps": run.step, "data": data.name, "seed": cfg.seed, "world_size": dist.world if dist else 1,
            "final_losses": {k: v for k, v in final.items() if k != "step"},
            "history": run.history, "wall_time_s": round(run.seconds(), 1),
            "options": cfg.to_dict(), "torch": str(torch.__version__)}
    if dist is None or dist.is_main:
        save_checkpoint(out, run.kept_model.cpu(), data.tokenizer, info)
    return info


# ----------------------------------------------------------------------------- the loop

def train(model_cfg: ModelConfig, cfg: TrainConfig, data, out: str | Path,
          resume: str | Path | None = None, progress: bool = True, log=None, dist: Dist | None = None) -> dict:
    """Train a model and write its checkpoint (and a resume file beside it).

    Args:
        model_cfg: the model to build (its vocab_size must match data.vocab_size).
        cfg: the training options.
        data: a data source from training.data.load_data.
        out: the checkpoint path; the resume file is `<out>.resume.pt`.
        resume: a resume file to continue from, or None.
        progress: show the progress (runtimes.progress) with the running losses.
        log: where the resume and evaluation lines go (default: stdout).
        dist: this process's rank in a torchrun job (training.distributed.from_env), or None.
    Returns:
        the checkpoint's "train" entry (steps, data, seed, world size, losses, history, wall time).
    """
    out = check_out_path(out)
    world = dist.world if dist else 1
    if cfg.batch_size % world:
        raise ConfigError(f"--batch-size {cfg.batch_size} is the global batch and must split evenly over the "
                          f"{world} ranks; pass a multiple of {world}")
    device = pick_device(cfg.device)
    if dist is not None:
        from training import distributed
        device = distributed.init(dist, device)
    try:
        return _train(model_cfg, cfg, data, out, resume, progress and (dist is None or dist.is_main), log, dist,
                      device)
    finally:
        if dist is not None:
            distributed.shutdown()


def _train(model_cfg: ModelConfig, cfg: TrainConfig, data, out: Path, resume, progress: bool, log, dist,
           device: torch.device) -> dict:
    main = dist is None or dist.is_main
    say = (log or print_line) if main else (lambda line: None)
    run = start_run(model_cfg, cfg, device)
    if cfg.latent_from is not None:
        adopt_trained_networks(run, cfg.latent_from, data)
    opts = LossOptions(cfg.token_weighting, cfg.latent_weighting, cfg.p_cfg)
    heldout = data.heldout_batches(cfg.batch_size, cfg.eval_batches)
    n_stage1 = stage1_steps(model_cfg, cfg)
    n_params = sum(p.numel() for p in run.model.parameters())
    batch = (f"global batch {cfg.batch_size} = {dist.world} ranks x {cfg.batch_size // dist.world}" if dist
             else f"batch {cfg.batch_size}")
    say(f"train {model_cfg.variant}: {n_params:,} parameters on {device}, {cfg.max_steps} steps, {batch}")
    if resume is not None:
        resume_run(run, resume, model_cfg, cfg)
        say(f"resumed from {resume} at step {run.step}")
    if dist is not None:
        run.gen.manual_seed(dist.seed(cfg.seed, run.step))
    run.started = time.time()
    try:
        with show_progress(cfg.max_steps, f"train {model_cfg.variant}", initial=run.step, enabled=progress) as bar:
            while run.step < cfg.max_steps:
                stage = enter_stage(run, n_stage1, latent_only=cfg.latent_from is not None)
                terms = train_step(run, data, device, cfg, stage, lambda_y_for(run.step, n_stage1, cfg), opts, dist)
                bar.set_postfix(**loss_fields(terms, stage, n_stage1, model_cfg.has_latent))
                bar.update(1)
                if main and (run.step % cfg.eval_every == 0 or run.step == cfg.max_steps):
                    run.history.append(evaluation_record(run, heldout, device, cfg, opts, model_cfg.has_latent))
                    (log or bar.write)(evaluation_line(run.history[-1], stage, n_stage1, run.seconds()))
                    write_resume(run, out, model_cfg, cfg)
        return write_checkpoint(run, out, data, cfg, dist)
    except KeyboardInterrupt:
        raise Interrupted(interrupt_note(run.step, run.saved, cfg)) from None
