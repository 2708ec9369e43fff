"""The Triton Python (BLS) model that `lddm-export triton-repo` writes as <name>/1/model.py.

It runs the sampling loop (runtimes.samplers.Sampler) inside Triton Inference Server and calls
the bundle's graphs as the repository's other models (ONNX Runtime or TensorRT plans) through
Business Logic Scripting, so the graphs run on Triton's own backends, on the GPU, with their
own instance groups. Requests follow runtimes.serving's protocol (the one `lddm-export serve`
speaks, errors included); the requests of one dynamic batch that share step counts share
sampler calls.

Imported only by Triton's Python backend, which provides triton_python_backend_utils; the
server's Python environment needs lddm-export installed (`pip install lddm-export[gpu]`).
The bundle's manifest lies beside this file (manifest.json) and is validated at load.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from runtimes.base import Runner
from runtimes.bundle import validate_manifest
from runtimes.errors import LddmError
from runtimes.samplers import Sampler, sampler_graphs
from runtimes.schedules import from_manifest
from runtimes.serving import INPUTS, Limits, RequestHandler
from runtimes.spec import ROWS, GraphSpec


class BlsRunner(Runner):
    """One graph of the bundle, run as the repository's model `model_name` through BLS.

    Tensors cross as DLPack, so on a GPU they stay on the device.
    """

    backend = "triton-bls"

    def __init__(self, spec: GraphSpec, model_name: str, device: str, max_batch: int):
        super().__init__(spec, device, max_batch)
        self.model_name = model_name

    def _activate_impl(self) -> None:
        pass

    def _infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # A per-row scalar (t: [B]) is [B, 1] on the wire; the graph model's config reshapes it back.
        inputs = [pb_utils.Tensor.from_dlpack(name, to_dlpack((value[:, None] if value.dim() == 1 else value).contiguous()))
                  for name, value in feed.items()]
        response = pb_utils.InferenceRequest(model_name=self.model_name, inputs=inputs,
                                             requested_output_names=self.spec.output_names).exec()
        if response.has_error():
            raise LddmError(f"model {self.model_name} failed: {response.error().message()}")
        return {name: from_dlpack(pb_utils.get_output_tensor_by_name(response, name).to_dlpack()).to(self.device)
                for name in self.spec.output_names}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        here = Path(__file__).resolve().parent
        manifest = validate_manifest(json.loads((here / "manifest.json").read_text()), here / "manifest.json")
        settings = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        gpu = args["model_instance_kind"] == "GPU" and torch.cuda.is_available()
        device = f"cuda:{args['model_instance_device_id']}" if gpu else "cpu"
        variant, shapes, max_batch = manifest["variant"], manifest["shapes"], manifest["batch_profile"]["max"]
        runners = {}
        for graph in sampler_graphs(variant, "sparse"):
            spec = GraphSpec.from_dict(graph, manifest["graphs"][graph])
            rows = shapes["L"] if spec.dynamic_axis == ROWS else 1
            runners[graph] = BlsRunner(spec, settings["graph_model_prefix"] + graph, device, max_batch * rows).activate()
        mask, latent = from_manifest(manifest["schedule"])
        sampler = Sampler(variant, runners, shapes, mask, latent, head="sparse")
        limits = Limits(**{field.name: int(settings[field.name]) for field in dataclasses.fields(Limits)})
        self.handler = RequestHandler(sampler, manifest, limits, max_batch)

    def execute(self, requests):
        arrays = [{name: tensor.as_numpy() for name in INPUTS
                   if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None}
                  for request in requests]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, array) for name, array in response.items()])
                for response in self.handler(arrays)]
