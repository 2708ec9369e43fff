"""`lddm-train`: train an MDLM / FUJI / SEQ / AR model and write model.pt.

    lddm-train --variant seq --data sawtooth --preset small --max-steps 2000 --out model.pt
    torchrun --nproc-per-node 2 $(which lddm-train) ...     # data-parallel (training/distributed.py)

Bad input (unknown variant, preset or data, a bad --out or --resume path, an integer option out
of the range --help states, a model or batch too large) is one sentence on stderr and exit
status 2, without a traceback. A write that fails at the end (a full disk) exits 1. Ctrl-C and
SIGTERM exit 130 and say which resume file, if any, holds the run.
"""
from __future__ import annotations

import argparse
import math
import signal
import sys
import time

import torch

from runtimes.errors import LddmError
from runtimes.options import MAX_BATCH, MAX_SEED, MAX_THREADS, OptionError, check_int
from training.checkpoint import MAX_MODEL_GIB, CheckpointError, model_gib
from training.config import LATENT_LAYOUTS, PRESETS, VARIANTS, ConfigError, ModelConfig
from training import distributed
from training.data import TOKENIZER_CHOICES, load_data
from training.losses import WEIGHTINGS
from training.trainer import Interrupted, TrainConfig, check_out_path, train

USAGE_ERROR = 2
MAX_BATCH_TOKENS = 2**24  # tokens of one training batch (--batch-size x --seq-len)
# Every integer option's range: stated in --help, checked by runtimes.options.check_int.
INT_RANGES = {
    "--max-steps": (1, 10**9), "--width": (1, 65_536), "--depth": (1, 1024), "--heads": (1, 1024),
    "--seq-len": (1, 65_536), "--n-latent": (1, 65_536), "--latent-dim": (1, 65_536),
    "--batch-size": (1, MAX_BATCH), "--warmup": (0, 10**9), "--seed": (0, MAX_SEED),
    "--lambda-y-warmup": (0, 10**9), "--lambda-y-delay": (0, 10**9), "--text-vocab": (1, 10**6),
    "--eval-every": (1, 10**9), "--eval-batches": (1, 100_000), "--threads": (0, MAX_THREADS),
}


class HelpWithDefaults(argparse.HelpFormatter):
    """Each option's help ends with its default, or "(required)"; flags and unset options show none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required:
            return f"{text} (required)".lstrip()
        if any(action.default is unset for unset in (None, False, argparse.SUPPRESS)) or "default:" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) with exit status 2."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"lddm-train: error: {message}\n")


def int_arg(group, flag: str, help: str = "", **kwargs) -> None:
    """An integer option checked against INT_RANGES[flag] (an OptionError, not argparse's words)."""
    low, high = INT_RANGES[flag]
    group.add_argument(flag, type=lambda text: check_int(flag, text, low, high), metavar="N",
                       help=f"{help} [{low}..{high}]".lstrip(), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = OneLineParser(prog="lddm-train", description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults,
                      epilog="example: lddm-train --variant seq --data sawtooth --preset small --max-steps 2000 "
                             "--out model.pt")
    p.add_argument("--variant", required=True, choices=VARIANTS,
                   help="mdlm: masked diffusion; fuji: tokens and latent jointly; seq: latent, then tokens; "
                        "ar: autoregressive (the evaluator of generative perplexity)")
    p.add_argument("--data", default=d.data, metavar="DATA",
                   help="sawtooth (synthetic), text:PATH (a UTF-8 text file) or lm1b (from the Hugging Face hub)")
    int_arg(p, "--max-steps", required=True, help="optimiser steps of the whole run (raise it to resume further)")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="the checkpoint to write; the resume file is <out>.resume.pt")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="small", choices=sorted(PRESETS),
                   help="named model size (training/config.py); the flags below override its fields")
    int_arg(g, "--width", help="model width (default: the preset's)")
    int_arg(g, "--depth", help="denoiser blocks (default: the preset's)")
    int_arg(g, "--heads", help="attention heads; must divide --width (default: the preset's)")
    int_arg(g, "--seq-len", default=128, help="L, tokens per sequence")
    int_arg(g, "--n-latent", help="P latent slots (default: the preset's, else 4)")
    int_arg(g, "--latent-dim", help="D per latent slot (default: the preset's, else 8)")
    g.add_argument("--latent-layout", choices=LATENT_LAYOUTS,
                   help="slots: learned slot queries read the whole text; chunks: slot i pools chunk i "
                        "of L / P tokens (default: the preset's, else slots)")
    g.add_argument("--mask-schedule", default="loglinear", choices=("linear", "loglinear"),
                   help="masking schedule of the tokens")
    g.add_argument("--latent-schedule", default="sqrt", choices=("sqrt", "cosine"),
                   help="noise schedule of the latent (fuji, seq)")
    g.add_argument("--no-unit-norm", action="store_true", help="do not project latents to the sphere")
    g.add_argument("--encoder-corruption", type=float, default=0.0, metavar="P",
                   help="probability of masking encoder inputs where x_t is masked")
    g.add_argument("--prompt-latent", action="store_true",
                   help="seq: a prompt-aware latent denoiser, which also reads the clamped tokens of a prompt "
                        "or template (trained on random clamps)")
    g.add_argument("--latent-from", metavar="CKPT",
                   help="seq: keep this trained seq checkpoint's encoder and token denoiser, frozen, and train "
                        "only a new latent denoiser (with --prompt-latent: make a model prompt-aware); pass the "
                        "--preset, sizes and data of the run that wrote it")
    g = p.add_argument_group("optimisation")
    int_arg(g, "--batch-size", default=d.batch_size, help="sequences per training batch (under torchrun: the global batch, split over the ranks)")
    g.add_argument("--lr", type=float, default=d.lr, metavar="X", help="AdamW learning rate after --warmup")
    int_arg(g, "--warmup", default=d.warmup, help="steps of linear learning-rate warmup")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, metavar="X", help="AdamW weight decay")
    g.add_argument("--ema", type=float, default=d.ema, metavar="X",
                   help="EMA decay (0: off); EMA weights are saved")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, metavar="X",
                   help="gradient norm clipping (0: off)")
    int_arg(g, "--seed", default=d.seed, help="seed of the initial weights and of every training draw")
    g = p.add_argument_group("losses")
    g.add_argument("--stage1-frac", type=float, default=d.stage1_frac, metavar="X",
                   help="fuji/seq: fraction of steps training encoder + token denoiser on L_x only")
    g.add_argument("--lambda-y", type=float, default=d.lambda_y, metavar="X",
                   help="fuji/seq: weight of the latent loss L_y")
    int_arg(g, "--lambda-y-warmup", default=d.lambda_y_warmup,
            help="steps of the linear ramp of lambda_y, from the start of stage 2")
    int_arg(g, "--lambda-y-delay", default=d.lambda_y_delay, help="steps at lambda_y = 0 before its ramp")
    g.add_argument("--p-cfg", type=float, default=d.p_cfg, metavar="P", help="latent dropout probability")
    g.add_argument("--token-weighting", default=d.token_weighting, choices=WEIGHTINGS,
                   help="weighting of the token loss over t")
    g.add_argument("--latent-weighting", default=d.latent_weighting, choices=WEIGHTINGS,
                   help="weighting of the latent loss over t")
    g = p.add_argument_group("data")
    g.add_argument("--tokenizer", default=d.tokenizer, choices=TOKENIZER_CHOICES,
                   help="text data: bpe (trained on the corpus) or bert (bert-base-uncased WordPiece)")
    int_arg(g, "--text-vocab", default=d.text_vocab, help="text data, bpe: vocabulary size")
    g = p.add_argument_group("run")
    int_arg(g, "--eval-every", default=d.eval_every,
            help="steps between held-out evaluations; each rewrites the resume file")
    int_arg(g, "--eval-batches", default=d.eval_batches, help="held-out batches per evaluation")
    int_arg(g, "--threads", default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"),
                   help="auto: cuda where torch sees a GPU, else cpu")
    g.add_argument("--resume", metavar="PATH", help="continue from a <out>.resume.pt")
    g.add_argument("--max-model-gib", type=float, default=MAX_MODEL_GIB, metavar="GIB",
                   help="refuse a model whose float32 weights are larger")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar or progress lines, only the evaluation lines")
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
        text_vocab=args.text_vocab, device=args.device, latent_from=args.latent_from)
    check_out_path(args.out)  # before the (possibly slow) data loading
    if not 0 < args.max_model_gib < math.inf:
        raise ConfigError(f"--max-model-gib {args.max_model_gib} must be a positive number of GiB, e.g. 16")
    if args.batch_size * args.seq_len > MAX_BATCH_TOKENS:
        raise ConfigError(f"--batch-size {args.batch_size} x --seq-len {args.seq_len} is "
                          f"{args.batch_size * args.seq_len:,} tokens a batch, above the limit of "
                          f"{MAX_BATCH_TOKENS:,}; lower --batch-size or --seq-len")
    data = load_data_saying_so(args)
    sizes = dict(PRESETS[args.preset])
    sizes.update({k: v for k, v in (("width", args.width), ("depth", args.depth), ("heads", args.heads),
                                     ("n_latent", args.n_latent), ("latent_dim", args.latent_dim),
                                     ("latent_layout", args.latent_layout)) if v is not None})
    model_cfg = ModelConfig(
        variant=args.variant, vocab_size=data.vocab_size, seq_len=args.seq_len,
        mask_schedule=args.mask_schedule, latent_schedule=args.latent_schedule,
        unit_norm_latent=not args.no_unit_norm, encoder_input_corruption=args.encoder_corruption,
        prompt_latent=args.prompt_latent, **sizes)
    check_model_size(model_cfg, args.max_model_gib)
    dist = distributed.from_env()
    info = train(model_cfg, cfg, data, args.out, resume=args.resume, progress=not args.no_progress, dist=dist)
    if dist is None or dist.is_main:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in info["final_losses"].items())
        print(f"wrote {args.out}: {info['steps']} steps, {info['wall_time_s']:.0f} s, {losses}")
    return info


def load_data_saying_so(args: argparse.Namespace):
    """load_data, with a line before and after for text, whose reading, tokenizer training and
    tokenizing take seconds to minutes before the first training step."""
    if not (args.data == "lm1b" or args.data.startswith("text:")):  # sawtooth, or a name load_data refuses
        return load_data(args.data, args.seq_len, args.tokenizer, args.text_vocab)
    tokenizer = (f"training a {args.text_vocab}-token BPE tokenizer on it" if args.tokenizer == "bpe"
                 else "loading the bert-base-uncased tokenizer")
    print(f"reading {args.data}, {tokenizer}, tokenizing it ...", flush=True)
    started = time.time()
    data = load_data(args.data, args.seq_len, args.tokenizer, args.text_vocab)
    print(f"{args.data}: {len(data.train_stream):,} training tokens, {data.heldout_blocks.numel():,} held out, "
          f"vocabulary {data.vocab_size} ({time.time() - started:.0f} s)", flush=True)
    return data


def check_model_size(model_cfg: ModelConfig, max_gib: float) -> None:
    """Refuse a model above `max_gib` GiB of float32 weights before it is allocated."""
    size = model_gib(model_cfg)
    if size > max_gib:
        raise ConfigError(f"the model of these sizes needs {size:.3g} GiB of weights, above the limit of "
                          f"{max_gib:g} GiB; lower --width, --depth or --seq-len, or raise --max-model-gib")


def main(argv: list[str] | None = None) -> None:
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM is Ctrl-C
    try:
        run(build_parser().parse_args(argv))
    except (ConfigError, CheckpointError, OptionError) as e:
        print(f"lddm-train: error: {e}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except LddmError as e:  # a write that failed at the end (runtimes.fileio.WriteError)
        print(f"lddm-train: error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f"lddm-train: {e}", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        print("lddm-train: interrupted before the first training step; this run wrote no resume file",
              file=sys.stderr)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    main()
