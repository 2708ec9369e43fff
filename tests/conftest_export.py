"""Shared helpers of the export tests (test_export, test_fp16, test_build): tiny random models,
their exported graphs (cached per process: an export takes seconds), ONNX Runtime sessions and
the parity inputs.

Weights are drawn at random (not the zero-initialised adaLN and heads of a fresh model, whose
outputs would be uniform and could not expose an export error).
"""
from __future__ import annotations

import functools

import onnx
import onnxruntime as ort
import torch

from lddm_export.build import DEFAULT_OPSET
from lddm_export.export import sample_inputs
from runtimes.spec import graph_specs
from training.config import PRESETS, ModelConfig
from training.model import LDDM, graph_modules

TINY = dict(seq_len=16, vocab_size=5, n_latent=3, latent_dim=4, **PRESETS["tiny"])
OPSET = DEFAULT_OPSET
BATCHES = (1, 3, 8)
TIMES = (0.001, 0.5, 0.999)


def random_model(variant: str, seed: int = 0, std: float = 0.2, **sizes) -> LDDM:
    """A tiny model of `variant` (TINY, with `sizes` overriding its fields) with every parameter
    drawn from N(0, std^2)."""
    torch.manual_seed(seed)
    model = LDDM(ModelConfig(variant=variant, **{**TINY, **sizes})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


@functools.lru_cache(maxsize=None)
def exported(variant: str) -> dict:
    """Export every graph of a random tiny `variant` model once per test process.

    Returns:
        graph name -> {"module": torch wrapper, "spec": GraphSpec, "fp32": ModelProto,
        "fp16": ModelProto, "report": MixedPrecisionReport}.
    """
    from lddm_export.export import export_graph
    from lddm_export.fp16 import to_mixed_fp16_with_report

    model = random_model(variant)
    cfg = model.cfg
    specs = graph_specs(variant, cfg.seq_len, cfg.n_latent, cfg.latent_dim, cfg.total_vocab)
    graphs = {}
    for name, module in graph_modules(model).items():
        fp32 = export_graph(module, specs[name], cfg.total_vocab, OPSET)
        fp16, report = to_mixed_fp16_with_report(fp32)
        graphs[name] = {"module": module, "spec": specs[name], "fp32": fp32, "fp16": fp16, "report": report}
    return graphs


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def parity_runs(module: torch.nn.Module, spec, vocab: int, seed: int = 1):
    """Fresh random inputs at every batch in BATCHES and t in TIMES, with the torch outputs.

    Yields:
        (label, feed: input name -> numpy array, ref: output name -> numpy float32 array).
    """
    generator = torch.Generator().manual_seed(seed)
    for batch in BATCHES:
        for t in TIMES:
            args = list(sample_inputs(spec, batch, vocab, generator))
            if "t" in spec.input_names:
                args[spec.input_names.index("t")] = torch.full((batch,), t)
            elif t != TIMES[0]:
                continue  # the encoder has no t: one run per batch
            with torch.no_grad():
                out = module(*args)
            out = out if isinstance(out, tuple) else (out,)
            feed = {s.name: a.numpy() for s, a in zip(spec.inputs, args)}
            ref = {s.name: o.numpy() for s, o in zip(spec.outputs, out)}
            yield f"batch {batch}, t {t}", feed, ref


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of a model (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types
