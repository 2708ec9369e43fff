"""`lddm-export verify`: three-level numerical parity of a bundle against its checkpoint.

Before any measurement: every bundle file must match its sha256 in the manifest, and the
checkpoint must be the one the bundle was built from (sha256).

1. Per graph: Polygraphy's Comparator runs the torch reference runner and the backend's
   runner (our runners behind Polygraphy's BaseRunner) on fresh random inputs at batch 1, 3
   and 8 and t in {0.001, 0.5, 0.999}; every output is held to its tolerance in
   runtimes/tolerances.py (FP32: max relative error; FP16: relative L2 of the softmax and KL).
2. Trajectory: the runtime sampler on the backend (with --head, sparse by default: what
   `sample` deploys) and on the torch reference (dense, the reference form), fed the same
   noise, stepped in lockstep: token agreement and latent error per step, unprompted and with
   the first quarter of every sample clamped (a prompt, runtimes/prompts.py). The torch runtime
   reproduces training/sampling.py token for token (tests/runtimes/test_runtime.py), so this is the
   comparison with the reference sampler. Gated for FP32 (>= 99.9% of tokens); reported for
   FP16, where a categorical draw that lands within rounding of a CDF boundary flips and
   the two trajectories legitimately part: FP16 and INT8 are gated on levels 1 and 3.
3. Distribution: samples of the backend at each precision (with --head) vs the torch FP32
   dense reference, same seeds. The manifest's "data" says what the model was trained on. Sawtooth: sliced
   Wasserstein distance to fresh data, within DISTRIBUTION_SWD_MARGIN of the reference's.
   Text: generative perplexity under an AR evaluator (--evaluator, an `lddm-train --variant
   ar` checkpoint with the bundle's tokenizer) within GEN_PPL_MARGIN, and unigram entropy
   within ENTROPY_MARGIN.

While it measures, verify logs one line per graph, trajectory and metric, and shows the
progress of the distribution sampling (the slow part) on stderr. The report is written to
<bundle>/parity.json (and --json FILE) and logged as a table: every measured value beside its
threshold.
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator
from polygraphy.logger import G_LOGGER

from lddm_export.commands.inspect import table
from runtimes.backends import make_runners
from runtimes.base import Runner
from runtimes.bundle import Bundle
from runtimes.compare import measure
from runtimes.errors import BundleError, ToleranceExceeded
from runtimes.fileio import sha256_file, write_json
from runtimes.noise import draw_noise, latent_shape
from runtimes.options import steps_per_call
from runtimes.progress import progress
from runtimes.prompts import FREE
from runtimes.samplers import Sampler, sample_batches, sampler_graphs
from runtimes.schedules import latent_steps_for
from runtimes.spec import DYNAMIC
from runtimes.tolerances import (DISTRIBUTION_SWD_MARGIN, ENTROPY_MARGIN, FP16_KL, FP16_REL_L2, FP32_MAX_REL,
                                 GEN_PPL_MARGIN, INT8_DISTRIBUTION_MARGIN, INT8_KL, INT8_REL_L2,
                                 TRAJECTORY_TOKEN_AGREEMENT, distribution_margin, graph_tolerances)
from training.checkpoint import load_checkpoint, load_reference_graphs

LEVEL1_BATCHES = (1, 3, 8)
LEVEL1_TIMES = (0.001, 0.5, 0.999)
Log = Callable[[str], None]


@dataclass(frozen=True)
class VerifyOptions:
    """What verify measures.

    Attributes:
        backend: the backend under test ("ort", "ort-trt" or "trt"); the reference is torch.
        precisions: the ONNX precisions to check.
        device: where both backends run ("cpu" or "cuda").
        seed: seeds the level-1 inputs and the sampling noise.
        steps, latent_steps: chain lengths for levels 2 and 3 (latent_steps: seq only, default steps).
        trajectory_samples: samples stepped in lockstep at level 2.
        distribution_samples: samples per precision at level 3.
        batch_size: samples per sampling call.
        evaluator: text bundles: the AR checkpoint that scores samples (generative perplexity).
        head: the tested sampler's token head ("sparse" or "dense"); the reference is dense.
    """

    backend: str = "ort"
    precisions: tuple[str, ...] = ("fp32", "fp16")
    device: str = "cpu"
    seed: int = 0
    steps: int = 8
    latent_steps: int | None = None
    trajectory_samples: int = 16
    distribution_samples: int = 1024
    batch_size: int = 64
    evaluator: str | None = None
    head: str = "sparse"


def open_verified(bundle_dir: str | Path, ckpt: str | Path) -> Bundle:
    """The bundle, with every file's hash checked and the checkpoint matched to it (sha256)."""
    bundle = Bundle.open(bundle_dir, check_hashes=True)
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise BundleError(f"checkpoint {ckpt} does not exist; pass the model.pt the bundle was built from")
    if sha256_file(ckpt) != bundle.manifest["checkpoint"]["sha256"]:
        raise BundleError(f"checkpoint {ckpt} is not the one bundle {bundle.root} was built from (sha256 "
                          f"differs); pass the original model.pt or rebuild the bundle from this one")
    return bundle


# ----------------------------------------------------------------------------- level 1

class PolygraphyRunner(BaseRunner):
    """Our Runner behind Polygraphy's BaseRunner interface (numpy feeds in and out)."""

    def __init__(self, runner: Runner):
        super().__init__(name=runner.name)
        self.runner = runner

    def activate_impl(self):
        self.runner.activate()

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for s in self.runner.spec.inputs:
            meta.add(s.name, np.dtype(s.dtype), [None if d in DYNAMIC else d for d in s.shape])
        return meta

    def infer_impl(self, feed_dict):
        started = time.perf_counter()
        out = self.runner.infer({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed_dict.items()})
        self.inference_time = time.perf_counter() - started  # Polygraphy reports it
        return OrderedDict((k, v.detach().cpu().numpy()) for k, v in out.items())

    def deactivate_impl(self):
        self.runner.deactivate()


def _level1_feeds(bundle: Bundle, graph: str, seed: int) -> list[OrderedDict]:
    from lddm_export.export import sample_inputs

    spec, generator = bundle.spec(graph), torch.Generator().manual_seed(seed)
    feeds = []
    for batch in LEVEL1_BATCHES:
        for t in LEVEL1_TIMES:
            tensors = sample_inputs(spec, batch, bundle.shapes["V"], generator)
            feed = OrderedDict((s.name, x.numpy()) for s, x in zip(spec.inputs, tensors))
            if "t" in feed:
                feed["t"] = np.full((batch,), t, dtype=np.float32)
            feeds.append(feed)
    return feeds


def verify_graphs(bundle: Bundle, ckpt: Path, options: VerifyOptions, precision: str, log: Log) -> dict:
    """Level 1 for every graph at one precision. Returns graph -> {passed, outputs, failures}."""
    G_LOGGER.module_severity = G_LOGGER.ERROR
    reference = make_runners(bundle, "torch", "fp32", options.device, ckpt=ckpt, reference=load_reference_graphs)
    tested = make_runners(bundle, options.backend, precision, options.device)
    results = {}
    for graph in bundle.graph_names:
        tolerances = graph_tolerances(precision, bundle.spec(graph).output_names)
        worst: dict[str, dict] = {}
        failures: list[str] = []

        def compare(ref_result, got_result, graph=graph, tolerances=tolerances, worst=worst, failures=failures):
            verdicts = OrderedDict()
            for name, tolerance in tolerances.items():
                report = measure(got_result[name], ref_result[name], tolerance)
                _keep_worst(worst, name, report.to_dict())
                failures.extend(f"{graph}.{name}: {f}" for f in report.failures)
                verdicts[name] = report.passed
            return verdicts

        feeds = _level1_feeds(bundle, graph, options.seed)
        run = Comparator.run([PolygraphyRunner(reference[graph]), PolygraphyRunner(tested[graph])],
                             data_loader=feeds)
        passed = bool(Comparator.compare_accuracy(run, compare_func=compare))
        results[graph] = {"passed": passed and not failures, "outputs": worst,
                          "failures": sorted(set(failures)), "cases": len(feeds)}
        log(f"[graphs/{precision}] {graph}: {'ok' if results[graph]['passed'] else 'FAIL'} "
            + ", ".join(f"{n} " + _brief(r) for n, r in worst.items()))
    return results


def _keep_worst(worst: dict, name: str, report: dict) -> None:
    if name not in worst:
        worst[name] = report
        return
    for key in ("max_abs", "max_rel", "rel_l2", "kl", "nonfinite"):
        if report[key] is not None and (worst[name][key] is None or report[key] > worst[name][key]):
            worst[name][key] = report[key]
    worst[name]["passed"] = worst[name]["passed"] and report["passed"]


def _brief(r: dict) -> str:
    kl = f" kl {r['kl']:.2e}" if r["kl"] is not None else ""
    return f"(max_rel {r['max_rel']:.2e}, rel_l2 {r['rel_l2']:.2e}{kl})"


# ----------------------------------------------------------------------------- level 2

def _sampler(bundle: Bundle, ckpt: Path, backend: str, precision: str, device: str, head: str) -> Sampler:
    """A sampler over active runners of one backend (the torch reference reads `ckpt`)."""
    graphs = list(sampler_graphs(bundle.variant, head))
    runners = (make_runners(bundle, "torch", precision, device, ckpt=ckpt, graphs=graphs,
                            reference=load_reference_graphs)
               if backend == "torch" else make_runners(bundle, backend, precision, device, graphs=graphs))
    return Sampler.from_bundle(bundle, {g: r.activate() for g, r in runners.items()}, head=head)


def verify_trajectory(bundle: Bundle, ckpt: Path, options: VerifyOptions, precision: str, log: Log) -> dict:
    """Level 2 at one precision: per-step token agreement and latent error vs the torch runtime."""
    reference = _sampler(bundle, ckpt, "torch", "fp32", options.device, "dense")
    tested = _sampler(bundle, ckpt, options.backend, precision, options.device, options.head)
    noise = draw_noise(options.seed, options.trajectory_samples, options.steps, bundle.shapes["L"],
                       latent_shape(bundle.variant, bundle.shapes))
    latent_steps = latent_steps_for(bundle.variant, options.steps, options.latent_steps)
    per_step = []
    for known in (None, _prompt_case(bundle, options)):
        for ref, got in zip(reference.steps(noise, latent_steps, known), tested.steps(noise, latent_steps, known)):
            step = {"prompted": known is not None, "phase": ref.phase, "index": ref.index, "t": ref.t,
                    "token_agreement": float((ref.x == got.x).double().mean())}
            if ref.y is not None:
                step["latent_max_abs"] = float((ref.y - got.y).abs().max())
            per_step.append(step)
    final = [s for s in per_step if not s["prompted"]][-1]["token_agreement"]
    prompted = per_step[-1]["token_agreement"]
    gated = precision == "fp32"
    passed = (final >= TRAJECTORY_TOKEN_AGREEMENT
              and all(s["token_agreement"] >= TRAJECTORY_TOKEN_AGREEMENT for s in per_step)) if gated else True
    latent = max((s.get("latent_max_abs", 0.0) for s in per_step), default=0.0)
    log(f"[trajectory/{precision}] {options.head} head vs the dense torch reference: token agreement "
        f"{final:.4%}, prompted {prompted:.4%} (min over steps "
        f"{min(s['token_agreement'] for s in per_step):.4%}), latent max abs error {latent:.2e}"
        f"{'' if gated else ' (reported, not gated)'}{'' if passed else ' FAIL'}")
    return {"passed": passed, "gated": gated, "final_token_agreement": final,
            "prompted_final_token_agreement": prompted, "steps": per_step, "samples": options.trajectory_samples}


def _prompt_case(bundle: Bundle, options: VerifyOptions) -> torch.Tensor:
    """The prompted case of level 2: the first quarter of every sample clamped to seeded ids."""
    L, V = bundle.shapes["L"], bundle.shapes["V"]
    known = torch.full((options.trajectory_samples, L), FREE, dtype=torch.int64)
    known[:, : max(1, L // 4)] = torch.randint(0, V - 1, (options.trajectory_samples, max(1, L // 4)),
                                               generator=torch.Generator().manual_seed(options.seed))
    return known


# ----------------------------------------------------------------------------- level 3

def _samples(bundle: Bundle, ckpt: Path, backend: str, precision: str, head: str,
             options: VerifyOptions) -> torch.Tensor:
    """The distribution samples of one backend, precision and head (progress on stderr)."""
    sampler = _sampler(bundle, ckpt, backend, precision, options.device, head)
    latent_steps = latent_steps_for(bundle.variant, options.steps, options.latent_steps)
    batches = -(-options.distribution_samples // options.batch_size)
    with progress(batches * steps_per_call(options.steps, latent_steps), f"verify: sampling ({backend} {precision})") as bar:
        return sample_batches(sampler, options.seed, options.distribution_samples, options.steps, latent_steps,
                              options.batch_size, callback=lambda b, step: bar.update(1)).tokens


def load_evaluator(bundle: Bundle, path: str | Path | None):
    """The AR model that scores a text bundle's samples, checked against the bundle.

    Returns:
        the evaluator LDDM, or None for a bundle without a tokenizer (synthetic data).
    Raises:
        BundleError: a text bundle without an evaluator, or one that is not an AR model of
            the bundle's tokenizer and length.
    """
    if bundle.manifest["tokenizer"] is None:
        return None
    if path is None:
        raise BundleError(f"bundle {bundle.root} holds a text model; pass --evaluator AR.pt (an `lddm-train "
                          f"--variant ar` checkpoint on the same corpus) to judge its samples by generative perplexity")
    model, raw = load_checkpoint(path)
    if model.cfg.variant != "ar":
        raise BundleError(f"--evaluator {path} is a {model.cfg.variant} model, not an AR model; "
                          f"pass a checkpoint trained with lddm-train --variant ar")
    tokenizer = bundle.manifest["tokenizer"]
    if raw["tokenizer"] is None or raw["tokenizer"].get("json") != tokenizer.get("json"):
        raise BundleError(f"--evaluator {path} uses another tokenizer than bundle {bundle.root}; "
                          f"pass an AR model trained on the bundle's corpus and vocabulary")
    if model.cfg.seq_len != bundle.shapes["L"]:
        raise BundleError(f"--evaluator {path} scores sequences of {model.cfg.seq_len} tokens, the bundle samples "
                          f"{bundle.shapes['L']}; pass an AR model trained with --seq-len {bundle.shapes['L']}")
    return model


def distribution_metrics(bundle: Bundle, evaluator, options: VerifyOptions) -> dict[str, tuple[Callable, float]]:
    """metric name -> (score of a [K, L] token set, allowed relative difference to the reference).

    The sawtooth (the manifest's data) is judged by SWD to fresh data, text by generative
    perplexity and unigram entropy, other synthetic token data by unigram entropy.
    """
    from training.data import sample_sawtooth
    from training.metrics import ar_perplexity, sliced_wasserstein, unigram_entropy

    if bundle.manifest["data"] == "sawtooth":
        data = sample_sawtooth(options.distribution_samples, bundle.shapes["L"],
                               torch.Generator().manual_seed(options.seed + 10_000))
        return {"swd_to_data": (lambda tokens: sliced_wasserstein(tokens, data), DISTRIBUTION_SWD_MARGIN)}
    if evaluator is None:
        return {"unigram_entropy": (unigram_entropy, ENTROPY_MARGIN)}
    return {"gen_ppl": (lambda tokens: ar_perplexity(evaluator, tokens), GEN_PPL_MARGIN),
            "unigram_entropy": (unigram_entropy, ENTROPY_MARGIN)}


def verify_distribution(bundle: Bundle, ckpt: Path, options: VerifyOptions, evaluator, log: Log) -> dict:
    """Level 3: each precision's samples vs the torch FP32 reference's (same seeds)."""
    metrics = distribution_metrics(bundle, evaluator, options)
    log(f"[distribution] sampling {options.distribution_samples} reference samples (torch fp32, dense head)")
    reference = _samples(bundle, ckpt, "torch", "fp32", "dense", options)
    results = {"samples": options.distribution_samples, "metrics": {}}
    for name, (score, margin) in metrics.items():
        results["metrics"][name] = {"reference": score(reference), "margin": margin, "precisions": {}}
    for precision in options.precisions:
        log(f"[distribution] sampling {options.distribution_samples} samples ({options.backend} {precision}, "
            f"{options.head} head)")
        tokens = _samples(bundle, ckpt, options.backend, precision, options.head, options)
        for name, (score, margin) in metrics.items():
            entry, margin = results["metrics"][name], distribution_margin(margin, precision)
            got = score(tokens)
            rel = abs(got - entry["reference"]) / max(abs(entry["reference"]), 1e-12)
            passed = math.isfinite(got) and rel <= margin
            entry["precisions"][precision] = {"value": got, "relative_difference": rel, "margin": margin,
                                              "passed": passed}
            log(f"[distribution/{precision}] {name} {got:.4f} vs reference {entry['reference']:.4f} "
                f"({rel:.2%}, margin {margin:.0%}){'' if passed else ' FAIL'}")
    results["passed"] = all(p["passed"] for m in results["metrics"].values() for p in m["precisions"].values())
    return results


# ----------------------------------------------------------------------------- all levels

def verify_bundle(bundle_dir: str | Path, ckpt: str | Path, options: VerifyOptions = VerifyOptions(),
                  json_path: str | Path | None = None, log: Log = print) -> dict:
    """Run the three levels, write parity.json (and json_path), log parity_table, return the report.

    Args:
        bundle_dir, ckpt: the bundle and the checkpoint it was built from.
        options: what to measure; json_path: a second copy of the report, or None.
        log: the record: one line per graph, trajectory and metric, then the table.
    Raises:
        BundleError: changed bundle files, or a checkpoint the bundle was not built from.
        ToleranceExceeded: after the report is written, when any gated check failed; the
            message names the failing graphs and outputs.
    """
    bundle, ckpt = open_verified(bundle_dir, ckpt), Path(ckpt)
    evaluator = load_evaluator(bundle, options.evaluator)
    report = {"bundle": str(bundle.root), "checkpoint": {"path": str(ckpt), "sha256": sha256_file(ckpt)},
              "variant": bundle.variant, "options": {**options.__dict__, "precisions": list(options.precisions)},
              "tolerances": {"fp32_max_rel": FP32_MAX_REL, "fp16_rel_l2": FP16_REL_L2, "fp16_kl": FP16_KL,
                             "int8_rel_l2": INT8_REL_L2, "int8_kl": INT8_KL,
                             "int8_distribution_margin": INT8_DISTRIBUTION_MARGIN,
                             "trajectory_token_agreement": TRAJECTORY_TOKEN_AGREEMENT,
                             "distribution_margin": DISTRIBUTION_SWD_MARGIN, "gen_ppl_margin": GEN_PPL_MARGIN,
                             "entropy_margin": ENTROPY_MARGIN},
              "graphs": {}, "trajectory": {}}
    for precision in options.precisions:
        report["graphs"][precision] = verify_graphs(bundle, ckpt, options, precision, log)
        report["trajectory"][precision] = verify_trajectory(bundle, ckpt, options, precision, log)
    report["distribution"] = verify_distribution(bundle, ckpt, options, evaluator, log)
    failures = [f for p in options.precisions for g in report["graphs"][p].values() for f in g["failures"]]
    failures += [f"trajectory ({p}): token agreement {report['trajectory'][p]['final_token_agreement']:.4%}"
                 for p in options.precisions if not report["trajectory"][p]["passed"]]
    failures += [f"distribution ({p}): {name} differs by {r['relative_difference']:.2%}"
                 for name, m in report["distribution"]["metrics"].items()
                 for p, r in m["precisions"].items() if not r["passed"]]
    report["passed"], report["failures"] = not failures, failures
    write_json(bundle.root / "parity.json", report, "the parity report")
    if json_path:
        write_json(json_path, report, "--json")
    log(parity_table(report))
    if failures:
        raise ToleranceExceeded(f"bundle {bundle.root} failed parity: {'; '.join(failures[:4])}"
                                f"{' and more' if len(failures) > 4 else ''} (details in parity.json)")
    return report


def parity_table(report: dict) -> str:
    """The report as a table: one row per measured value, beside its threshold and the verdict."""
    rows = []
    for precision, graphs in report["graphs"].items():
        for graph, result in graphs.items():
            tolerances = graph_tolerances(precision, list(result["outputs"]))
            for output, measured in result["outputs"].items():
                rows += _graph_rows(precision, f"{graph}.{output}", measured, tolerances[output])
    for precision, result in report["trajectory"].items():
        lowest = min(step["token_agreement"] for step in result["steps"])
        threshold = f">= {TRAJECTORY_TOKEN_AGREEMENT:.1%}" if result["gated"] else "reported"
        rows.append(["trajectory", "token agreement (lowest step)", precision, f"{lowest:.4%}", threshold,
                     _verdict(result["passed"]) if result["gated"] else "-"])
    for name, metric in report["distribution"]["metrics"].items():
        for precision, r in metric["precisions"].items():
            rows.append(["distribution", f"{name} vs torch fp32", precision,
                         f"{r['relative_difference']:.2%} ({r['value']:.4g} vs {metric['reference']:.4g})",
                         f"<= {r['margin']:.0%}", _verdict(r["passed"])])
    return table(rows, ["level", "check", "precision", "measured", "threshold", "result"])


def _graph_rows(precision: str, name: str, measured: dict, tolerance) -> list[list[str]]:
    """Level-1 rows of one output: each limited metric, and NaN/Inf where there were any."""
    rows = []
    for metric in ("max_rel", "rel_l2", "kl"):
        limit = getattr(tolerance, metric)
        if limit is None:
            continue
        value = measured[metric]
        label = f"{name} {metric}" + (" (softmax)" if metric == "rel_l2" and tolerance.on_softmax else "")
        rows.append(["graph", label, precision, "-" if value is None else f"{value:.2e}", f"<= {limit:.2g}",
                     _verdict(value is not None and value <= limit)])
    if measured["nonfinite"]:
        rows.append(["graph", f"{name} NaN/Inf", precision, str(measured["nonfinite"]), "0", _verdict(False)])
    return rows


def _verdict(passed: bool) -> str:
    return "ok" if passed else "FAIL"
