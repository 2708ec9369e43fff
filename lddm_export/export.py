"""ONNX export of the graph wrappers (training.model.graph_modules) into checked FP32 graphs.

Exporter: torch.onnx.export(..., dynamo=True), chosen explicitly. On torch 2.13 the TorchScript
exporter (dynamo=False) cannot export these modules: LayerNorm32 passes the normalised shape
as `(x.shape[-1],)`, which the tracer records as a tensor, and the TorchScript symbolic of
layer_norm refuses it ("Failed to export ... because it is not constant"). The dynamo exporter
traces with torch.export, keeps static dims as integers and gives a clean graph: one
LayerNormalization per norm (opset >= 17), scaled_dot_product_attention as MatMul/Softmax/
MatMul, the final LogSoftmax, B as the only symbolic dim, and every node tagged with the
module it came from (node metadata "namespace"), which the FP16 pass reads to find the rotary
embedding. The exporter's own optimizer (onnxscript) folds constants; onnxslim then removes
what is left (shape arithmetic, identity chains).

After export: B symbolic and every other dim fixed as runtimes.spec says, onnx.checker with
full shape inference on the saved file, weights as external data above 2 GB.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path

import onnx
import torch

from runtimes.errors import LddmError, ShapeMismatch
from runtimes.spec import GraphSpec

EXTERNAL_DATA_BYTES = 2 * 1024 ** 3  # protobuf cannot serialise a message above 2 GB
EXPORTER = "torch.onnx.export(dynamo=True)"
TRACE_BATCH = 2           # not 1: torch.export would specialise a batch of 1 into the graph

ONNX_DTYPES = {"int64": onnx.TensorProto.INT64, "float32": onnx.TensorProto.FLOAT}


def sample_inputs(spec: GraphSpec, batch: int, vocab: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random inputs for one graph, in the spec's input order.

    Args:
        spec: the graph's spec (runtimes.spec.graph_specs).
        batch: B.
        vocab: V, the exclusive upper bound of int64 token ids (mask token included).
        generator: torch RNG to draw from.
    Returns:
        one tensor per input: int64 ids in [0, V), float32 t in [0, 1] for "t",
        float32 standard normal for latents.
    """
    tensors = []
    for s in spec.inputs:
        shape = s.concrete_shape(batch)
        if s.dtype == "int64":
            tensors.append(torch.randint(0, vocab, shape, generator=generator))
        elif s.name == "t":
            tensors.append(torch.rand(shape, generator=generator))
        else:
            tensors.append(torch.randn(shape, generator=generator))
    return tuple(tensors)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's progress lines and its warnings about optional torchvision ops."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_graph(module: torch.nn.Module, spec: GraphSpec, vocab: int, opset: int) -> onnx.ModelProto:
    """Export one graph wrapper to a cleaned FP32 ONNX model, its dynamic axis (B or N) symbolic.

    Args:
        module: the wrapper (eval mode, CPU), taking the spec's inputs positionally.
        spec: names, dtypes and shapes of its inputs and outputs.
        vocab: V, for the sample token ids the exporter traces with.
        opset: ONNX default-domain opset (>= 17 for LayerNormalization; build.check_opset).
    Returns:
        the ONNX model, checked by check_io against the spec.
    Raises:
        LddmError: the exporter failed (the message names the graph).
        ShapeMismatch: the exported I/O does not match the spec.
    """
    args = sample_inputs(spec, TRACE_BATCH, vocab, torch.Generator().manual_seed(0))
    batch = torch.export.Dim(spec.dynamic_axis, min=1)
    dynamic_shapes = {s.name: {0: batch} for s in spec.inputs}
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, verbose=False, optimize=True,
                input_names=spec.input_names, output_names=spec.output_names,
                dynamic_shapes=dynamic_shapes)
    except Exception as e:  # the exporter raises many types; the user needs which graph and why
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise LddmError(f"exporting graph {spec.name!r} to ONNX opset {opset} failed ({first}); "
                        f"check that torch {torch.__version__} supports this opset") from e
    model = clean_graph(program.model_proto)
    check_io(model, spec)
    return model


def clean_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold constants and remove dead or redundant nodes with onnxslim, keeping node metadata.

    onnxslim rebuilds nodes without their metadata_props; the exporter's "namespace" tags
    (which module a node came from) are put back by node name, as the FP16 pass and anyone
    reading the graph (Netron, calibration) use them.
    """
    import onnxslim

    metadata = {n.name: list(n.metadata_props) for n in model.graph.node if n.metadata_props}
    slimmed = onnxslim.slim(model)
    for node in slimmed.graph.node:
        if node.name in metadata and not node.metadata_props:
            node.metadata_props.extend(metadata[node.name])
    return slimmed


def _dims(value_info: onnx.ValueInfoProto) -> list:
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
            for d in value_info.type.tensor_type.shape.dim]


def check_io(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """The graph's inputs and outputs are the spec's: names, order, dtypes, B or N symbolic, rest fixed.

    Raises:
        ShapeMismatch: naming the tensor, what the graph has and what the spec expects.
    """
    for kind, values, specs in (("input", model.graph.input, spec.inputs),
                                ("output", model.graph.output, spec.outputs)):
        names = [v.name for v in values]
        if names != [s.name for s in specs]:
            raise ShapeMismatch(f"graph {spec.name!r} has {kind}s {names}, expected {[s.name for s in specs]}")
        for value, s in zip(values, specs):
            dtype = value.type.tensor_type.elem_type
            if dtype != ONNX_DTYPES[s.dtype]:
                raise ShapeMismatch(f"{kind} {s.name!r} of graph {spec.name!r} has ONNX dtype "
                                    f"{onnx.TensorProto.DataType.Name(dtype)}, expected {s.dtype}")
            dims = _dims(value)
            if dims != list(s.shape):
                raise ShapeMismatch(f"{kind} {s.name!r} of graph {spec.name!r} has dims {dims}, expected "
                                    f"{list(s.shape)} (only {spec.dynamic_axis!r} symbolic, the others fixed)")


def set_metadata(model: onnx.ModelProto, props: dict) -> None:
    """Record string key/values (dicts and lists as JSON) in the model's metadata_props."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in props.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        if key in existing:
            existing[key].value = text
        else:
            model.metadata_props.add(key=key, value=text)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Total size of the model's initializers (raw or typed storage), in bytes."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.raw_data:
            total += len(tensor.raw_data)
        else:
            total += onnx.numpy_helper.to_array(tensor).nbytes
    return total


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Save and check a model; weights go to `<file>.data` beside it above 2 GB.

    Args:
        model: the model to write.
        path: the .onnx file to create.
    Returns:
        the files written (the .onnx, and the .data file where there is one).
    Raises:
        LddmError: onnx.checker (with full shape inference) rejects the saved model.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    files = [path]
    if initializer_bytes(model) > EXTERNAL_DATA_BYTES:
        data = path.with_name(path.name + ".data")
        model = _copy(model)  # save_model(save_as_external_data=True) rewrites the model it is given
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        data.chmod(path.stat().st_mode & 0o777)  # onnx creates it owner-only; readers need the pair
        files.append(data)
    else:
        onnx.save_model(model, path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise LddmError(f"the exported graph {path.name} fails onnx.checker ({first}); "
                        f"this is a bug in the export, please report it with the checkpoint's config") from None
    return files
