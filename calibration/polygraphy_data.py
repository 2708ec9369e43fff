"""A Polygraphy data loader: one graph's feeds along a bundle's own sampling trajectories.

The feeds INT8 and the FP16 islands are calibrated on (calibration.trajectories.record_bundle_feeds),
for Polygraphy's tools, e.g. to compare a graph on two backends on realistic inputs, or to
calibrate with Polygraphy instead:

    LDDM_BUNDLE=bundles/model LDDM_GRAPH=denoiser polygraphy run bundles/model/onnx/denoiser.int8.onnx \\
        --onnxrt --data-loader-script calibration/polygraphy_data.py:load_data

LDDM_BUNDLE names the bundle (it must have FP32 graphs), LDDM_GRAPH one of its graphs.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from runtimes.errors import LddmError


def load_data() -> Iterator[dict[str, np.ndarray]]:
    """Yield the graph's recorded feeds as {input name: numpy array}, in call order."""
    from calibration.trajectories import record_bundle_feeds
    from runtimes.bundle import Bundle

    root, graph = os.environ.get("LDDM_BUNDLE"), os.environ.get("LDDM_GRAPH")
    if not root or not graph:
        raise LddmError("calibration/polygraphy_data.py reads the bundle and graph from the environment; "
                        "set LDDM_BUNDLE=DIR and LDDM_GRAPH=NAME (e.g. denoiser)")
    bundle = Bundle.open(root)
    if graph not in bundle.graph_names:
        raise LddmError(f"LDDM_GRAPH={graph!r} is not a graph of bundle {root}; choose one of "
                        f"{', '.join(bundle.graph_names)}")
    for feed in record_bundle_feeds(bundle)[graph]:
        yield {name: x.numpy() for name, x in feed.items()}
