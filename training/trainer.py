"""The training loop: AdamW with linear warmup, EMA, gradient clipping, bf16 autocast on CUDA,
two-stage training for the latent variants, periodic held-out evaluation, resumable runs.

Stages (fuji, seq): the first round(stage1_frac * max_steps) steps train the encoder and the
token denoiser through L_x only; afterwards the encoder is frozen and both losses train, with
lambda_y ramped from the start of stage 2. stage1_frac = 0 is single-stage joint training
(the encoder stays trainable, L_y on from step 0). mdlm and ar have one stage.

Resuming: a resume file beside the output (`<out>.resume.pt`) holds the weights, the EMA, the
optimizer, the step and the random state; it is rewritten at every evaluation and at the end.
A resumed run draws the same batches as an uninterrupted one; max_steps may be raised. Ctrl-C
(or SIGTERM) raises Interrupted, whose message names the resume file that holds the run and its
step, or says that this run has written none yet (before its first evaluation).

Both files are written through runtimes.fileio.write_atomic: a kill mid-write leaves the
previous file, never half of one.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from runtimes.fileio import WriteError, check_input_file, check_target, write_atomic
from training.checkpoint import CheckpointError, save_checkpoint
from training.config import ConfigError, ModelConfig
from training.data import HELDOUT_SEED
from training.losses import WEIGHTINGS, LossOptions, compute_loss, lambda_y_at
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
    return round(cfg.stage1_frac * cfg.max_steps) if model_cfg.has_latent else 0


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


# ----------------------------------------------------------------------------- the loop

def train(model_cfg: ModelConfig, cfg: TrainConfig, data, out: str | Path,
          resume: str | Path | None = None, progress: bool = True, log=None) -> dict:
    """Train a model and write its checkpoint (and a resume file beside it).

    Args:
        model_cfg: the model to build (its vocab_size must match data.vocab_size).
        cfg: the training options.
        data: a data source from training.data.load_data.
        out: the checkpoint path; the resume file is `<out>.resume.pt`.
        resume: a resume file to continue from, or None.
        progress: show a tqdm bar with the losses.
        log: where evaluation lines go.
    Returns:
        the checkpoint's "train" entry (steps, data, seed, losses, history, wall time).
    """
    log = log or (lambda line: print(line, flush=True))
    out = check_out_path(out)
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = LDDM(model_cfg).to(device).train()
    ema_model = copy.deepcopy(model).requires_grad_(False) if cfg.ema > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed)
    opts = LossOptions(cfg.token_weighting, cfg.latent_weighting, cfg.p_cfg)
    heldout = data.heldout_batches(cfg.batch_size, cfg.eval_batches)
    n_stage1 = stage1_steps(model_cfg, cfg)

    step, elapsed, history, recent = 0, 0.0, [], []
    saved = None  # (resume file, its step): where this run can be continued from
    if resume is not None:
        state = load_resume(resume, model_cfg, cfg)
        model.load_state_dict(state["model"])
        if ema_model is not None:
            ema_model.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        step, elapsed, history, recent = state["step"], state["elapsed"], state["history"], state["recent"]
        saved = (Path(resume), step)
        log(f"resumed from {resume} at step {step}")

    def lambda_y(at_step: int) -> float:
        return lambda_y_at(at_step - n_stage1, cfg.lambda_y, cfg.lambda_y_warmup, cfg.lambda_y_delay)

    def snapshot() -> dict:
        return {"model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(), "step": step,
                "model": model.state_dict(), "ema": ema_model.state_dict() if ema_model else None,
                "optimizer": opt.state_dict(), "generator": gen.get_state(),
                "elapsed": elapsed + time.time() - start, "history": history, "recent": recent}

    start = time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not progress, dynamic_ncols=True)
    try:
        while step < cfg.max_steps:
            stage = 1 if step < n_stage1 else 2
            if model_cfg.has_latent and n_stage1 > 0:
                model.encoder.requires_grad_(stage == 1)
                if step == n_stage1:
                    recent = []  # the running train losses restart with the new loss
                    if ema_model is not None:
                        # The frozen encoder defines the latents of stage 2; the saved one must be it.
                        ema_model.encoder.load_state_dict(model.encoder.state_dict())
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            x0 = data.train_batch(cfg.batch_size, gen).to(device)
            with autocast(device):
                terms = compute_loss(model, x0, gen, stage, lambda_y(step), opts)
            if not math.isfinite(terms.total.item()):
                raise ConfigError(f"the loss became {terms.total.item()} at step {step}; "
                                  f"lower --lr or raise --warmup")
            opt.zero_grad(set_to_none=True)
            terms.total.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if ema_model is not None:
                update_ema(ema_model, model, step, cfg.ema)
            step += 1
            recent = (recent + [(terms.loss_x, terms.loss_y)])[-100:]
            bar.update(1)
            bar.set_postfix(stage=stage, loss_x=f"{terms.loss_x:.4f}", loss_y=f"{terms.loss_y:.4f}", refresh=False)
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                ev = evaluate(ema_model or model, heldout, device, cfg.lambda_y, opts)
                record = {"step": step, "train_x": sum(r[0] for r in recent) / len(recent),
                          "heldout_x": ev["heldout_x"]}
                if model_cfg.has_latent:
                    record.update(train_y=sum(r[1] for r in recent) / len(recent), heldout_y=ev["heldout_y"])
                history.append(record)
                stage_note = [f"stage {stage}"] if n_stage1 else []
                line = " ".join([f"step {step}:", *stage_note,
                                 *(f"{k} {v:.4f}" for k, v in record.items() if k != "step"),
                                 f"({elapsed + time.time() - start:.0f} s)"])
                (bar.write if progress else log)(line)
                save_resume(resume_path(out), snapshot())
                saved = (resume_path(out), step)
        bar.close()
        final = history[-1] if history else {}
        info = {"steps": step, "data": data.name, "seed": cfg.seed,
                "final_losses": {k: v for k, v in final.items() if k != "step"},
                "history": history, "wall_time_s": round(elapsed + time.time() - start, 1),
                "options": cfg.to_dict(), "torch": str(torch.__version__)}
        save_checkpoint(out, (ema_model or model).cpu(), data.tokenizer, info)
    except KeyboardInterrupt:
        bar.close()
        raise Interrupted(interrupt_note(step, saved, cfg)) from None
    return info
