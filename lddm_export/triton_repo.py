"""A Triton Inference Server model repository from a bundle (`lddm-export triton-repo`).

    REPO/
      lddm/                    the sampler: a Python (BLS) model, runtimes.serving's protocol
        config.pbtxt           dynamic batching of requests, instance group
        1/model.py             lddm_export/triton_model.py
        1/manifest.json        the bundle's manifest (variant, shapes, schedule, tokenizer)
      lddm_trunk/              one model per graph the sparse sampler calls:
        config.pbtxt           tensorrt_plan, onnxruntime_onnx, or the python backend
        1/model.plan | 1/model.onnx (+ its external data) | 1/model.py + 1/model.onnx
      lddm_head/ ...

Graph models: "tensorrt" takes the bundle's engines (built for the server's GPU: build them
there with `lddm-export build --bundle DIR --engines on`), "onnxruntime" the ONNX graphs on
Triton's ONNX Runtime backend, and "python" the ONNX graphs on ONNX Runtime inside Triton's
Python backend (lddm_export/triton_graph_model.py), for servers built without the ONNX Runtime
backend, such as the one PyTriton bundles. The graph models' first dimension is Triton's batch
dimension (the head's is its rows), so concurrent sampler instances' calls batch too.

The configs are built as ModelConfig messages (tritonclient's model_config_pb2, the schema
Triton parses) and written in protobuf text format. The repository is written beside --out and
renamed into place: an interrupted run leaves nothing.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from lddm_export.commit import check_not_in_use, exclusive, replace_directory
from runtimes.bundle import Bundle
from runtimes.errors import LddmError
from runtimes.samplers import sampler_graphs
from runtimes.serving import INPUTS, OUTPUTS, Limits
from runtimes.spec import TensorSpec

GRAPH_BACKENDS = ("auto", "tensorrt", "onnxruntime", "python")
KINDS = ("gpu", "cpu")
MODEL_VERSION = "1"
HERE = Path(__file__).resolve().parent


class RepoError(LddmError):
    """A model repository cannot be written from this bundle with these options."""


def model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise RepoError("writing Triton configs needs tritonclient, which is not installed; "
                        "pip install 'lddm-export[serve]'") from None
    return model_config_pb2


def data_type(mc, dtype) -> int:
    return {"int64": mc.TYPE_INT64, "float32": mc.TYPE_FP32, "bytes": mc.TYPE_STRING}[dtype]


def add_tensor(mc, field, name: str, dtype: str, dims: tuple, optional: bool = False) -> None:
    """One input or output, its shape without Triton's batch dimension; a per-row scalar (the
    graphs' t: [B]) is dims [1] reshaped to [] for the model."""
    tensor = field.add(name=name, data_type=data_type(mc, dtype), dims=list(dims) or [1])
    if not dims:
        tensor.reshape.SetInParent()
    if optional:
        tensor.optional = True


def sampler_config(name: str, manifest: dict, limits: Limits, max_requests: int, queue_delay_us: int,
                   instances: int, kind: str, graph_prefix: str):
    """The BLS sampler model's ModelConfig: runtimes.serving's INPUTS and OUTPUTS."""
    mc = model_config_pb2()
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=max_requests)
    for input_name, (dtype, dims, optional) in INPUTS.items():
        add_tensor(mc, config.input, input_name, "bytes" if dtype.__name__ == "bytes_" else "int64", dims, optional)
    for output_name, (dtype, dims) in OUTPUTS.items():
        dims = tuple(manifest["shapes"]["L"] if d == "L" else d for d in dims)
        add_tensor(mc, config.output, output_name, "bytes" if dtype.__name__ == "bytes_" else "int64", dims)
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(count=instances, kind=_kind(mc, kind))
    for key, value in (("graph_model_prefix", graph_prefix), *dataclasses.asdict(limits).items()):
        config.parameters[key].string_value = str(value)
    return config


def graph_config(name: str, bundle: Bundle, graph: str, backend: str, kind: str):
    """One graph's ModelConfig: its spec's tensors, its dynamic axis as Triton's batch dimension."""
    mc = model_config_pb2()
    config = mc.ModelConfig(name=name, max_batch_size=bundle.profile(graph)["max"])
    if backend == "python":
        config.backend = "python"
    else:
        config.platform = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx"}[backend]
    spec = bundle.spec(graph)
    for field, tensors in ((config.input, spec.inputs), (config.output, spec.outputs)):
        for tensor in tensors:
            add_tensor(mc, field, tensor.name, tensor.dtype, _item_dims(tensor))
    config.dynamic_batching.SetInParent()
    config.instance_group.add(count=1, kind=_kind(mc, "cpu" if backend == "python" else kind))
    return config


def _item_dims(tensor: TensorSpec) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape[1:])


def _kind(mc, kind: str) -> int:
    return mc.ModelInstanceGroup.KIND_GPU if kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU


def choose_graph_backend(bundle: Bundle, graphs: tuple[str, ...], precision: str, backend: str) -> str:
    """`backend`, or for "auto" tensorrt where the bundle has an engine of every graph, else onnxruntime."""
    engined = {e["graph"] for e in bundle.manifest["engines"] if e["precision"] == precision}
    if backend == "tensorrt" and not set(graphs) <= engined:
        raise RepoError(f"bundle {bundle.root} has no {precision} TensorRT engines for "
                        f"{sorted(set(graphs) - engined)}; build them on the server's GPU with `lddm-export build "
                        f"--bundle {bundle.root} --engines on --precision {precision}`, or use --graph-backend onnxruntime")
    if backend == "auto":
        return "tensorrt" if set(graphs) <= engined else "onnxruntime"
    return backend


def _graph_files(bundle: Bundle, graph: str, precision: str, backend: str) -> dict[str, Path]:
    """Repository file name (in the version directory) -> bundle file, for one graph model."""
    if backend == "tensorrt":
        engines = [e for e in bundle.manifest["engines"] if e["graph"] == graph and e["precision"] == precision]
        gpus = sorted({e["gpu_name"] for e in engines})
        if len(engines) > 1:   # an engine runs only on the GPU it was built for
            raise RepoError(f"bundle {bundle.root} has {precision} engines of graph {graph!r} for several GPUs "
                            f"({', '.join(gpus)}); build the repository from a bundle with the server GPU's engines "
                            f"only, or use --graph-backend onnxruntime")
        return {"model.plan": bundle.root / engines[0]["file"]}
    onnx_path = bundle.onnx_path(graph, precision)
    files = {"model.onnx": onnx_path}
    for location in _external_data(onnx_path):
        files[location] = onnx_path.parent / location
    if backend == "python":
        files["model.py"] = HERE / "triton_graph_model.py"
    return files


def _external_data(onnx_path: Path) -> list[str]:
    """The external-data files an ONNX graph names (validated by Bundle.open: listed, beside it)."""
    import onnx

    from runtimes.bundle import onnx_tensors

    model = onnx.load_model(str(onnx_path), load_external_data=False)
    return sorted({entry.value for tensor in onnx_tensors(model) if tensor.data_location == onnx.TensorProto.EXTERNAL
                   for entry in tensor.external_data if entry.key == "location"})


def write_repo(bundle_dir: Path, out: Path, name: str, precision: str, graph_backend: str, kind: str,
               limits: Limits, max_requests: int, queue_delay_us: int, instances: int, force: bool,
               log=print) -> Path:
    """Write the model repository of the module docstring; returns `out`.

    Raises:
        RepoError, BundleError: one sentence naming the input and the fix.
    """
    from google.protobuf import text_format

    bundle = Bundle.open(bundle_dir)
    graphs = sampler_graphs(bundle.variant, "sparse")
    for graph in graphs:
        bundle.onnx_path(graph, precision)   # refuses a precision the bundle lacks
    backend = choose_graph_backend(bundle, graphs, precision, graph_backend)
    if out.exists() and not force:
        raise RepoError(f"--out {out} exists; pass --force to replace it, or choose another --out")
    check_not_in_use(out, bundle.root, source_is="the bundle being read")
    prefix = f"{name}_"
    sampler = sampler_config(name, bundle.manifest, limits, max_requests, queue_delay_us, instances, kind, prefix)
    configs = {name: (sampler, {"model.py": HERE / "triton_model.py"})}
    for graph in graphs:
        configs[prefix + graph] = (graph_config(prefix + graph, bundle, graph, backend, kind),
                                   _graph_files(bundle, graph, precision, backend))

    def fill(tmp: Path) -> None:
        for model, (config, files) in configs.items():
            version = tmp / model / MODEL_VERSION
            version.mkdir(parents=True)
            (tmp / model / "config.pbtxt").write_text(text_format.MessageToString(config))
            for target, source in files.items():
                shutil.copyfile(source, version / target)
            log(f"  {model}: {config.platform or config.backend}")
        (tmp / name / MODEL_VERSION / "manifest.json").write_text(json.dumps(bundle.manifest, indent=2) + "\n")

    with exclusive(out, log):
        replace_directory(out, fill)
    log(f"wrote the Triton model repository {out}: sampler model {name!r} ({kind}), graphs on {backend} "
        f"({precision})")
    return out
