"""`lddm-train`: train an MDLM / FUJI / SEQ / AR model and write model.pt.

    lddm-train --variant seq --data sawtooth --preset small --max-steps 2000 --out model.pt

Bad input (unknown variant, preset or data, a bad --out or --resume path, an out-of-range
option) is one sentence on stderr and exit status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import sys

import torch

from training.checkpoint import CheckpointError
from training.config import PRESETS, VARIANTS, ConfigError, ModelConfig
from training.data import DATA_CHOICES, TOKENIZER_CHOICES, load_data
from training.losses import WEIGHTINGS
from training.trainer import TrainConfig, check_out_path, train

USAGE_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) with exit status 2."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"lddm-train: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = OneLineParser(prog="lddm-train", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", required=True, choices=VARIANTS)
    p.add_argument("--data", default="sawtooth", help=f"one of {', '.join(DATA_CHOICES)}")
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--out", required=True, help="checkpoint path; the resume file is <out>.resume.pt")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="small", choices=sorted(PRESETS),
                   help="named model size (training/config.py); the flags below override its fields")
    g.add_argument("--width", type=int, help="model width (default: the preset's)")
    g.add_argument("--depth", type=int, help="denoiser blocks (default: the preset's)")
    g.add_argument("--heads", type=int, help="attention heads; must divide --width (default: the preset's)")
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--n-latent", type=int, help="P latent slots (default: the preset's, else 4)")
    g.add_argument("--latent-dim", type=int, help="D per latent slot (default: the preset's, else 8)")
    g.add_argument("--mask-schedule", default="loglinear", choices=("linear", "loglinear"))
    g.add_argument("--latent-schedule", default="sqrt", choices=("sqrt", "cosine"))
    g.add_argument("--no-unit-norm", action="store_true", help="do not project latents to the sphere")
    g.add_argument("--encoder-corruption", type=float, default=0.0,
                   help="probability of masking encoder inputs where x_t is masked")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--warmup", type=int, default=d.warmup)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--ema", type=float, default=d.ema, help="EMA decay (0: off); EMA weights are saved")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0: off")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("losses")
    g.add_argument("--stage1-frac", type=float, default=d.stage1_frac,
                   help="fuji/seq: fraction of steps training encoder + token denoiser on L_x only")
    g.add_argument("--lambda-y", type=float, default=d.lambda_y)
    g.add_argument("--lambda-y-warmup", type=int, default=d.lambda_y_warmup)
    g.add_argument("--lambda-y-delay", type=int, default=d.lambda_y_delay)
    g.add_argument("--p-cfg", type=float, default=d.p_cfg, help="latent dropout probability")
    g.add_argument("--token-weighting", default=d.token_weighting, choices=WEIGHTINGS)
    g.add_argument("--latent-weighting", default=d.latent_weighting, choices=WEIGHTINGS)
    g = p.add_argument_group("data")
    g.add_argument("--tokenizer", default=d.tokenizer, choices=TOKENIZER_CHOICES)
    g.add_argument("--text-vocab", type=int, default=d.text_vocab, help="bpe vocabulary size")
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=d.eval_every)
    g.add_argument("--eval-batches", type=int, default=d.eval_batches)
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    g.add_argument("--resume", help="continue from a <out>.resume.pt")
    g.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    return p


def run(args: argparse.Namespace) -> dict:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        data=args.data, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
        warmup=args.warmup, weight_decay=args.weight_decay, ema=args.ema, grad_clip=args.grad_clip,
        seed=args.seed, stage1_frac=args.stage1_frac, lambda_y=args.lambda_y,
        lambda_y_warmup=args.lambda_y_warmup, lambda_y_delay=args.lambda_y_delay, p_cfg=args.p_cfg,
        token_weighting=args.token_weighting, latent_weighting=args.latent_weighting,
        eval_every=args.eval_every, eval_batches=args.eval_batches, tokenizer=args.tokenizer,
        text_vocab=args.text_vocab, device=args.device)
    check_out_path(args.out)  # before the (possibly slow) data loading
    data = load_data(args.data, args.seq_len, args.tokenizer, args.text_vocab)
    sizes = dict(PRESETS[args.preset])
    sizes.update({k: v for k, v in (("width", args.width), ("depth", args.depth), ("heads", args.heads),
                                     ("n_latent", args.n_latent), ("latent_dim", args.latent_dim)) if v is not None})
    model_cfg = ModelConfig(
        variant=args.variant, vocab_size=data.vocab_size, seq_len=args.seq_len,
        mask_schedule=args.mask_schedule, latent_schedule=args.latent_schedule,
        unit_norm_latent=not args.no_unit_norm, encoder_input_corruption=args.encoder_corruption, **sizes)
    info = train(model_cfg, cfg, data, args.out, resume=args.resume, progress=not args.no_progress)
    losses = ", ".join(f"{k} {v:.4f}" for k, v in info["final_losses"].items())
    print(f"wrote {args.out}: {info['steps']} steps, {info['wall_time_s']:.0f} s, {losses}")
    return info


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ConfigError, CheckpointError) as e:
        print(f"lddm-train: error: {e}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except KeyboardInterrupt:
        print("lddm-train: interrupted; the last resume file is beside --out", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
