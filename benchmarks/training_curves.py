"""Held-out loss curves of shipped example checkpoints, from the history each checkpoint holds.

    python benchmarks/training_curves.py examples/text-{mdlm,fuji,seq,ar}.pt --out results/text_training.png

Prints a markdown table (held-out L_x per evaluation step, and L_y for the latent variants)
and writes the plot. Nothing is recomputed: lddm-train records the curve while it trains.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from training.checkpoint import read_checkpoint


def histories(paths: list[str]) -> dict[str, list[dict]]:
    out = {}
    for path in paths:
        ckpt = read_checkpoint(path)
        out[ckpt["config"]["variant"]] = ckpt["train"]["history"]
    return out


def table(curves: dict[str, list[dict]], every: int) -> str:
    steps = sorted({r["step"] for rows in curves.values() for r in rows if r["step"] % every == 0})
    lines = ["| step | " + " | ".join(map(str, steps)) + " |", "|---|" + "---|" * len(steps)]
    for variant, rows in curves.items():
        by_step = {r["step"]: r for r in rows}
        for key in ("heldout_x", "heldout_y"):
            if any(key in r for r in rows):
                cells = [f"{by_step[s][key]:.3f}" if s in by_step else "" for s in steps]
                lines.append(f"| {variant} {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: dict[str, list[dict]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant, rows in curves.items():
        label = f"{variant.upper()} (next-token CE)" if variant == "ar" else f"{variant.upper()} (NELBO)"
        ax.plot([r["step"] for r in rows], [r["heldout_x"] for r in rows], label=label)
    ax.set_xlabel("training step (batch 64 x 128 tokens)")
    ax.set_ylabel("held-out loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--out", required=True, help="the plot (.png)")
    p.add_argument("--every", type=int, default=200, help="table columns: every this many steps")
    args = p.parse_args()
    curves = histories(args.checkpoints)
    print(table(curves, args.every))
    plot(curves, Path(args.out))


if __name__ == "__main__":
    main()
