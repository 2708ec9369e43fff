"""Record what every graph is fed along whole sampling trajectories.

Activation statistics for precision decisions must come from the inputs the graphs really see
at inference: the all-masked first step, the nearly clean last step, latents at every noise
level. A random-input export check sees none of these distributions. So the runtime sampler is
run (on FP32 runners) and a RecordingRunner keeps a copy of every feed.
"""
from __future__ import annotations

import torch

from runtimes.base import Runner
from runtimes.noise import draw_noise, latent_shape
from runtimes.options import steps_per_call
from runtimes.progress import progress
from runtimes.prompts import FREE
from runtimes.samplers import Sampler
from runtimes.schedules import latent_steps_for
from runtimes.spec import HEADS

CALIBRATION_SEEDS = (0, 1)
CALIBRATION_BATCH = 8
CALIBRATION_STEPS = 8


class RecordingRunner(Runner):
    """Wraps a runner and keeps a CPU copy of every feed it is given.

    Args:
        inner: the runner that computes the outputs (already constructed, activated by us).
    Attributes:
        feeds: list of recorded feeds, each {input name: CPU tensor}, in call order.
    """

    backend = "recording"

    def __init__(self, inner: Runner):
        super().__init__(inner.spec, str(inner.device), inner.max_batch)
        self.inner = inner
        self.feeds: list[dict[str, torch.Tensor]] = []

    def _activate_impl(self) -> None:
        self.inner.activate()

    def _deactivate_impl(self) -> None:
        self.inner.deactivate()

    def _infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.feeds.append({name: x.detach().cpu().clone() for name, x in feed.items()})
        return self.inner.infer(feed)


def record_feeds(sampler: Sampler, seeds: list[int], batch: int, token_steps: int,
                 latent_steps: int | None = None) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Run the sampler once per seed and head form and return every feed of every graph
    (progress on stderr).

    Each seed is sampled with the dense head (the token graphs' feeds) and with the sparse head
    (the trunk's, and the head's: the hidden rows that unmask); a prompt-aware SEQ model once
    more, prompted with the first half of each sample, so that its latent denoiser is seen
    reading tokens. The encoder is not called while sampling; it is fed the sampled token
    sequences, which stand for the data it encodes.

    Args:
        sampler: a Sampler over active runners (FP32, any backend) of every graph either head
            form calls; its runners are wrapped.
        seeds: one sampling call of `batch` samples per seed (noise per docs/contracts.md).
        batch: samples per call.
        token_steps, latent_steps: the chain lengths to sample with (latent_steps: seq only).
    Returns:
        graph name -> list of feeds ({input name: CPU tensor}); "encoder" gets {"tokens": ...}
        with the final samples when the sampler's variant has an encoder.
    """
    recorders = {name: RecordingRunner(runner).activate() for name, runner in sampler.runners.items()}
    recording = {head: Sampler(sampler.variant, recorders, sampler.shapes, sampler.mask_schedule,
                               sampler.latent_schedule, sampler.float64_draws, head=head) for head in HEADS}
    shapes = sampler.shapes
    samples = []
    calls = len(HEADS) + sampler.prompt_latent
    steps = len(seeds) * calls * steps_per_call(token_steps, latent_steps)
    with progress(steps, "calibrate: sampling trajectories") as bar:
        for seed in seeds:
            noise = draw_noise(seed, batch, token_steps, shapes["L"], latent_shape(sampler.variant, shapes))
            for head in HEADS:
                tokens = recording[head].sample(noise, latent_steps, callback=lambda step: bar.update(1)).tokens
            if sampler.prompt_latent:   # its latent denoiser reads prompts: the samples' first halves
                known = torch.where(torch.arange(shapes["L"]) < shapes["L"] // 2, tokens.cpu(), FREE)
                recording["dense"].sample(noise, latent_steps, callback=lambda step: bar.update(1), known=known)
            samples.append(tokens.cpu())
    feeds = {name: r.feeds for name, r in recorders.items()}
    if sampler.variant != "mdlm":
        feeds["encoder"] = [{"tokens": tokens} for tokens in samples]
    return feeds


def record_bundle_feeds(bundle) -> dict[str, list[dict[str, torch.Tensor]]]:
    """record_feeds of a bundle's FP32 graphs on ONNX Runtime (CPU): CALIBRATION_SEEDS, a batch of
    CALIBRATION_BATCH and chains of CALIBRATION_STEPS token (and SEQ latent) steps, so every
    graph is seen at every t of the grid. What FP16 islands and INT8 ranges are chosen from.

    Args:
        bundle: a runtimes.bundle.Bundle with FP32 ONNX graphs (hashes need not be final).
    """
    from runtimes.backends import make_runners

    runners = {g: r.activate() for g, r in make_runners(bundle, "ort", "fp32", "cpu").items()}
    try:
        return record_feeds(Sampler.from_bundle(bundle, runners), list(CALIBRATION_SEEDS), CALIBRATION_BATCH,
                            CALIBRATION_STEPS, latent_steps_for(bundle.variant, CALIBRATION_STEPS))
    finally:
        for runner in runners.values():
            runner.deactivate()
