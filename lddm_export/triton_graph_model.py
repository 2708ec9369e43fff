"""One bundle graph on ONNX Runtime inside Triton's Python backend (`triton-repo --graph-backend python`).

Written as <name>_<graph>/1/model.py beside the graph's model.onnx, for Triton servers built
without the ONNX Runtime backend (the one PyTriton bundles has only the Python backend). The
tensors' names come from the model's config; each request of a dynamic batch is one
InferenceSession.run on the CPU.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]
        path = Path(__file__).resolve().parent / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            arrays = self.session.run(self.outputs, feeds)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, array) for name, array in zip(self.outputs, arrays)]))
        return responses
