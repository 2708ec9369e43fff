"""calibration/: trajectory feeds, activation statistics, FP16 islands (INT8: test_int8.py)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from calibration.fp16_islands import calibrate_fp16_islands, choose_fp32_islands
from calibration.stats import TensorStats, activation_stats
from calibration.trajectories import record_feeds
from lddm_export.fp16 import fp16_nodes_by_rule
from runtimes.backends import make_runners
from runtimes.bundle import Bundle
from runtimes.errors import ToleranceExceeded
from runtimes.samplers import Sampler
from fixtures import cached_tiny_bundle

STEPS, SEEDS, BATCH = 4, [0, 1], 3


@pytest.fixture(scope="module")
def fuji(bundle_cache):  # noqa: F811
    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "fuji"))
    runners = {g: r.activate() for g, r in make_runners(bundle, "ort").items()}
    feeds = record_feeds(Sampler.from_bundle(bundle, runners), SEEDS, BATCH, STEPS)
    model = onnx.load(bundle.onnx_path("denoiser", "fp32"))
    return bundle, feeds, model


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feed.items()})


def test_feeds_cover_every_step_of_every_trajectory(fuji):
    _, feeds, _ = fuji
    denoiser = feeds["denoiser"]
    assert len(denoiser) == STEPS * len(SEEDS)
    assert all(f["x_t"].shape[0] == BATCH for f in denoiser)
    # the first step of a trajectory sees t = 1 and all tokens masked, the last one t = 1/STEPS
    assert float(denoiser[0]["t"][0]) == 1.0 and float(denoiser[STEPS - 1]["t"][0]) == pytest.approx(1 / STEPS)
    assert len(feeds["encoder"]) == len(SEEDS)


def test_a_prompt_aware_latent_denoiser_is_recorded_reading_prompts(bundle_cache):  # noqa: F811
    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "seq", prompt_latent=True))
    runners = {g: r.activate() for g, r in make_runners(bundle, "ort").items()}
    feeds = record_feeds(Sampler.from_bundle(bundle, runners), SEEDS, BATCH, STEPS, STEPS)["latent_denoiser"]
    mask, L = bundle.shapes["mask_id"], bundle.shapes["L"]
    prompted = [f["clamped"] for f in feeds if (f["clamped"] != mask).any()]
    assert len(feeds) == 3 * STEPS * len(SEEDS) and len(prompted) == STEPS * len(SEEDS)   # dense, sparse, prompted
    assert all((c[:, : L // 2] != mask).all() and (c[:, L // 2:] == mask).all() for c in prompted)


def test_activation_stats_are_finite_and_consistent(fuji):
    _, feeds, model = fuji
    stats = activation_stats(model, feeds["denoiser"])
    assert len(stats) > 20  # every float intermediate of the MM-DiT, not just the outputs
    for s in stats.values():
        assert s.nonfinite == 0
        assert np.isfinite(s.absmax) and s.rms <= s.absmax + 1e-12
        assert s.percentile(50) <= s.percentile(99.99) <= s.absmax
    # the graph's own output: log-probs with the mask column at about -1e4
    log_probs = stats["log_probs"]
    assert 9e3 < log_probs.absmax < 1.1e4


def test_histogram_statistics():
    s = TensorStats("n", "Mul")
    s.update(np.array([0.0, 1e-9, 0.5, 2.0, 3.0, np.nan]))
    assert s.nonfinite == 1 and s.zeros == 1 and s.count == 5 and s.absmax == 3.0
    assert s.fraction_below(2.0 ** -24) == pytest.approx(1 / 4)
    assert s.percentile(100) == 3.0


def test_an_overflowing_node_becomes_an_fp32_island(fuji):
    _, feeds, model = fuji
    # In the healthy graph only the SUBS penalty (the mask logit - 1e4) and what follows it
    # come near the FP16 range, by design.
    healthy = choose_fp32_islands(activation_stats(model, feeds["denoiser"]))
    assert {d.op_type for d in healthy} <= {"Add", "LogSoftmax"}
    assert all("absmax 1e+04" in d.reason for d in healthy)
    # Scale one projection's weights so its output leaves FP16's range at the recorded inputs.
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    consumers = {i: n for n in broken.graph.node if n.op_type == "MatMul" for i in n.input}
    init = next(i for i in broken.graph.initializer if i.name in consumers and len(i.dims) == 2)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3e4, init.name))
    islands = choose_fp32_islands(activation_stats(broken, feeds["denoiser"]))
    reasons = {d.node: d.reason for d in islands}
    assert consumers[init.name].name not in {d.node for d in healthy}
    assert "overflow" in reasons[consumers[init.name].name]


def test_nan_in_the_fp32_graph_is_an_error_not_an_island():
    s = TensorStats("bad", "Div")
    s.update(np.array([1.0, np.inf]))
    with pytest.raises(ToleranceExceeded, match="NaN/Inf"):
        choose_fp32_islands({"bad_out": s})


def test_calibrate_every_graph_of_a_bundle(fuji):
    bundle, feeds, _ = fuji
    models = {g: onnx.load(bundle.onnx_path(g, "fp32")) for g in bundle.graph_names}
    decisions = calibrate_fp16_islands(models, feeds, fp16_nodes_by_rule)
    assert set(decisions) == set(bundle.graph_names)


def test_build_records_calibrated_islands_and_keeps_them_fp32(bundle_cache, tmp_path):
    from fixtures import cached_full_bundle
    from lddm_export.build import build_bundle, parse_options

    root, ckpt = cached_full_bundle(bundle_cache, "fuji")
    bundle = Bundle.open(root)
    assert bundle.manifest["fp16_calibration"] is True
    islands = bundle.manifest["graphs"]["denoiser"]["fp16_islands"]
    # the SUBS penalty (mask logit - 1e4) is within 8x of FP16's range: calibration keeps it FP32
    penalty = [d for d in islands if d["op_type"] == "Add" and "overflow" in d["reason"]]
    assert penalty
    fp16 = onnx.shape_inference.infer_shapes(onnx.load(bundle.onnx_path("denoiser", "fp16")))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in fp16.graph.value_info}
    node = next(n for n in fp16.graph.node if n.name == penalty[0]["node"])
    assert types[node.output[0]] == onnx.TensorProto.FLOAT
    from lddm_export.commands.inspect import describe
    assert f"denoiser  {penalty[0]['node']}" in describe(bundle.root, bundle.manifest)

    plain = build_bundle(ckpt, tmp_path / "plain", parse_options(engines="off", calibrate=False), log=lambda line: None)
    manifest = Bundle.open(plain).manifest
    assert manifest["fp16_calibration"] is False and manifest["graphs"]["denoiser"]["fp16_islands"] == []
