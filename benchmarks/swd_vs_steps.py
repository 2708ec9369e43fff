"""SWD to fresh sawtooth data vs token steps, for the MDLM, FUJI and SEQ example checkpoints.

For each checkpoint, number of token steps T and sampling seed, draw n samples with the
reference sampler (training.sampling.sample, batch b seeded with seed + b) and measure the
sliced Wasserstein distance (1000 directions) to n fresh data sequences; report the mean and
spread over the seeds. Scale:
- floor: SWD between independent data draws of size n (mean over --floor-pairs pairs);
- factorized one-step: every token drawn independently from its exact data marginal
  (p(x_i = 1) = 0.5 for the sawtooth, whatever i), which is what a perfect MDLM produces in
  one step; no factorized one-step sampler can match the data's cross-token structure.
Also measured: unigram entropy and SWD of float64 vs float32 categorical draws at one setting.

    python benchmarks/swd_vs_steps.py            # writes benchmarks/results/swd_vs_steps.{json,png}
                                                 # and the summary results/sawtooth.{json,png}
    python benchmarks/swd_vs_steps.py --from-json benchmarks/results/swd_vs_steps.json
                                                 # the summary of a recorded run, without sampling
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from runtimes.fileio import sha256_file
from training.checkpoint import load_checkpoint
from training.data import sample_sawtooth
from training.metrics import SWD_DIRECTIONS, sliced_wasserstein, unigram_entropy
from training.sampling import sample

RESULTS = Path(__file__).parent / "results"
SUMMARY = Path(__file__).resolve().parent.parent / "results" / "sawtooth.json"


def data_draw(n: int, seq_len: int, seed: int) -> torch.Tensor:
    return sample_sawtooth(n, seq_len, torch.Generator().manual_seed(seed))


def factorized_draw(n: int, seq_len: int, seed: int) -> torch.Tensor:
    """Independent tokens from the sawtooth's exact per-position marginal, p(x_i = 1) = 0.5."""
    return (torch.rand(n, seq_len, generator=torch.Generator().manual_seed(seed)) < 0.5).long()


def mean_std(values: list[float]) -> dict:
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "std": std, "values": values}


def benchmark(args) -> tuple[dict, dict]:
    """SWD vs steps for every variant and sampling seed.

    Returns:
        (results, {(variant, steps): int64 [n, L] tokens of the first seed}).
    """
    reference = data_draw(args.n, args.seq_len, args.data_seed)

    def swd(samples: torch.Tensor) -> float:
        return sliced_wasserstein(samples, reference, SWD_DIRECTIONS, args.swd_seed)

    floor = mean_std([swd(data_draw(args.n, args.seq_len, args.data_seed + 1 + i)) for i in range(args.floor_pairs)])
    factorized = mean_std([swd(factorized_draw(args.n, args.seq_len, args.data_seed + 101 + i))
                           for i in range(args.floor_pairs)])
    print(f"floor {floor['mean']:.4f} +- {floor['std']:.4f}; factorized one-step "
          f"{factorized['mean']:.4f} ({factorized['mean'] / floor['mean']:.2f}x floor)", flush=True)
    results = {"floor": floor, "factorized_one_step": factorized, "variants": {}}
    first_seed_tokens = {}
    for variant in args.variants:
        path = Path(args.examples) / f"sawtooth-{variant}.pt"
        model, ckpt = load_checkpoint(path)
        model.to(args.device)
        if model.cfg.seq_len != args.seq_len:
            raise SystemExit(f"{path} was trained with seq_len {model.cfg.seq_len}; pass --seq-len {model.cfg.seq_len}")
        latent_steps = args.latent_steps if variant == "seq" else None
        row = {"checkpoint": str(path), "sha256": sha256_file(path), "train_steps": ckpt["train"].get("steps"),
               "latent_steps": latent_steps, "swd": {}, "entropy": {}, "seconds": {}}
        for steps in args.steps:
            start = time.perf_counter()
            swds, entropies = [], []
            for seed in args.seeds:
                tokens = sample(model, seed, args.n, steps, latent_steps, args.batch_size).tokens
                first_seed_tokens.setdefault((variant, steps), tokens)
                swds.append(swd(tokens))
                entropies.append(unigram_entropy(tokens))
            row["seconds"][steps] = round(time.perf_counter() - start, 1)
            row["swd"][steps], row["entropy"][steps] = mean_std(swds), mean_std(entropies)
            ratio = np.array(swds) / floor["mean"]
            print(f"{variant:5s} T={steps:4d}  swd {np.mean(swds):.4f}  ({ratio.mean():.2f}x floor, "
                  f"{ratio.min():.2f}-{ratio.max():.2f} over seeds)  {row['seconds'][steps]}s", flush=True)
        results["variants"][variant] = row
    return results, first_seed_tokens


def precision_check(args, float64_tokens: torch.Tensor) -> dict:
    """float64 vs float32 categorical draws at one setting: same model, seed, steps and noise."""
    variant, steps = args.precision_variant, args.precision_steps
    model, _ = load_checkpoint(Path(args.examples) / f"sawtooth-{variant}.pt")
    model.to(args.device)
    float32_tokens = sample(model, args.seeds[0], args.n, steps, args.latent_steps if variant == "seq" else None,
                            args.batch_size, float64=False).tokens
    reference = data_draw(args.n, args.seq_len, args.data_seed)
    out = {"variant": variant, "steps": steps}
    for name, tokens in (("float64", float64_tokens), ("float32", float32_tokens)):
        out[name] = {"entropy": unigram_entropy(tokens),
                     "swd": sliced_wasserstein(tokens, reference, SWD_DIRECTIONS, args.swd_seed)}
    out["token_agreement"] = float((float64_tokens == float32_tokens).double().mean())
    print(f"precision ({variant}, T={steps}): {json.dumps(out)}", flush=True)
    return out


def plot(results: dict, steps: list[int], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = results["floor"]["mean"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, row in results["variants"].items():
        label = variant.upper() + (f" ({row['latent_steps']} latent steps)" if row["latent_steps"] else "")
        ax.errorbar(steps, [row["swd"][s]["mean"] / floor for s in steps],
                    yerr=[row["swd"][s]["std"] / floor for s in steps], marker="o", capsize=3, label=label)
    ax.axhline(1.0, color="k", lw=1, label="data floor")
    ax.axhline(1.2, color="k", lw=1, ls=":", label="1.2x floor (paper's SEQ claim)")
    ax.axhline(results["factorized_one_step"]["mean"] / floor, color="gray", ls="--",
               label="factorized one-step (exact marginals)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.set_xlabel("token steps")
    ax.set_ylabel("SWD / data floor")
    ax.set_title(f"Binary sawtooth, n = {results['config']['n']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(results: dict, steps: list[int]) -> str:
    floor = results["floor"]["mean"]
    lines = ["SWD / data floor, mean ± std over the sampling seeds", "",
             "| model | " + " | ".join(f"T={s}" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]
    for variant, row in results["variants"].items():
        name = variant.upper() + (f" (T_y={row['latent_steps']})" if row["latent_steps"] else "")
        lines.append(f"| {name} | " + " | ".join(
            f"{row['swd'][s]['mean'] / floor:.2f} ± {row['swd'][s]['std'] / floor:.2f}" for s in steps) + " |")
    f = results["factorized_one_step"]["mean"]
    lines.append(f"\ndata floor {floor:.4f} (std {results['floor']['std']:.4f} over {len(results['floor']['values'])} pairs); "
                 f"factorized one-step {f:.4f} ({f / floor:.2f}x floor)")
    if "precision" in results:
        pr = results["precision"]
        lines.append(f"float64 vs float32 draws ({pr['variant']}, T={pr['steps']}): entropy "
                     f"{pr['float64']['entropy']:.6f} vs {pr['float32']['entropy']:.6f}, "
                     f"token agreement {pr['token_agreement']:.6f}")
    return "\n".join(lines)


def summary(results: dict) -> dict:
    """The headline table: {"floor": float, "<variant>": {"<steps>": {"swd", "swd_std"}}}, SWD in the floor's units."""
    out = {"floor": results["floor"]["mean"]}
    for variant, row in results["variants"].items():
        out[variant] = {str(s): {"swd": v["mean"], "swd_std": v["std"]} for s, v in row["swd"].items()}
    return out


def write_summary(results: dict, steps: list[int], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary(results), indent=2) + "\n")
    plot(results, steps, path.with_suffix(".png"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", default="examples", help="folder with sawtooth-{variant}.pt")
    p.add_argument("--variants", nargs="+", default=["mdlm", "fuji", "seq"])
    p.add_argument("--steps", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32, 128])
    p.add_argument("--latent-steps", type=int, default=64, help="SEQ's latent DDIM steps")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1000, 2000, 3000, 4000],
                   help="sampling seeds, one sample set each (batch b uses seed + b)")
    p.add_argument("--data-seed", type=int, default=2026, help="reference data draw; floor pairs use +1.., factorized +101..")
    p.add_argument("--swd-seed", type=int, default=0, help="seed of the 1000 projection directions")
    p.add_argument("--floor-pairs", type=int, default=5)
    p.add_argument("--precision-variant", default="mdlm")
    p.add_argument("--precision-steps", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="torch device of the models (cpu, cuda)")
    p.add_argument("--out", default=str(RESULTS / "swd_vs_steps.json"))
    p.add_argument("--summary", default=str(SUMMARY), help="the headline table (and its plot, .png)")
    p.add_argument("--from-json", help="write the summary of a recorded run instead of sampling")
    args = p.parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        for row in results["variants"].values():  # JSON object keys are strings; the steps are ints
            row["swd"] = {int(k): v for k, v in row["swd"].items()}
        write_summary(results, results["config"]["steps"], Path(args.summary))
        print(table(results, results["config"]["steps"]))
        return
    torch.set_num_threads(args.threads)
    if args.precision_steps not in args.steps or args.precision_variant not in args.variants:
        raise SystemExit("--precision-variant and --precision-steps must be among --variants and --steps "
                         "(the float64 run is reused)")
    results, tokens = benchmark(args)
    results["precision"] = precision_check(args, tokens[args.precision_variant, args.precision_steps])
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results["config"] = {k: v for k, v in vars(args).items() if k != "out"} | {
        "torch": torch.__version__, "device_name": device_name}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.steps, out.with_suffix(".png"))
    write_summary(results, args.steps, Path(args.summary))
    print(table(results, args.steps))


if __name__ == "__main__":
    main()
