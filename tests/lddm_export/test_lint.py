"""`polygraphy check lint` finds nothing wrong in the graphs of a built bundle, FP32 and FP16.

Lint runs the ONNX checker and then each node through onnxruntime on generated inputs, here
token ids across the whole vocabulary (the mask id included; polygraphy's default range is
[0, 1]) and t in [0, 1]. It needs onnx-graphsurgeon, a dependency in pyproject.toml.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import cached_full_bundle
from runtimes.bundle import Bundle

POLYGRAPHY = "import sys; from polygraphy.tools import main; sys.exit(main())"


# Between them every kind of graph: FUJI's, and the two that only SEQ has.
GRAPHS = {"fuji": ("encoder", "denoiser", "trunk", "head"), "seq": ("latent_denoiser", "token_denoiser")}


@pytest.fixture(scope="module", params=list(GRAPHS))
def bundle(request, bundle_cache) -> Bundle:
    return Bundle.open(cached_full_bundle(bundle_cache, request.param)[0])


def value_ranges(graph: dict, vocab: int) -> list[str]:
    """polygraphy --val-range arguments: token ids in [0, V), t in [0, 1], latents N(0, 1)-sized."""
    ranges = []
    for spec in graph["inputs"]:
        low, high = (0, vocab - 1) if spec["dtype"] == "int64" else (0.0, 1.0) if spec["name"] == "t" else (-3.0, 3.0)
        ranges.append(f"{spec['name']}:[{low},{high}]")
    return ranges


def test_polygraphy_lint_finds_no_error_in_any_graph(bundle, tmp_path):
    pytest.importorskip("onnx_graphsurgeon")
    vocab = bundle.shapes["V"]
    assert set(GRAPHS[bundle.variant]) <= set(bundle.manifest["graphs"])
    for name in GRAPHS[bundle.variant]:
        graph = bundle.manifest["graphs"][name]
        for precision, rel in graph["onnx"].items():
            report = tmp_path / f"{name}.{precision}.json"
            result = subprocess.run([sys.executable, "-c", POLYGRAPHY, "check", "lint", str(bundle.root / rel),
                                     "-o", str(report), "--val-range", *value_ranges(graph, vocab)],
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{rel}:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
            entries = json.loads(Path(report).read_text())["lint_entries"]
            problems = [e for e in entries if e["level"] != "warning"]
            assert not problems, f"{rel}: {problems}"
