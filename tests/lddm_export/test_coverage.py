"""Every exported (variant, graph) pair has an FP32 and an FP16 parity test (as optimum's
test_all_models_tested): adding a graph to runtimes.spec.GRAPHS_BY_VARIANT without tests fails here."""
from __future__ import annotations

import pytest

from test_export import FP32_PARITY_CASES
from test_fp16 import FP16_PARITY_CASES
from runtimes.spec import GRAPHS_BY_VARIANT
from training import model

EXPORTED_PAIRS = {(variant, graph) for variant, graphs in GRAPHS_BY_VARIANT.items() for graph in graphs}


@pytest.mark.parametrize("precision,cases", [("fp32", FP32_PARITY_CASES), ("fp16", FP16_PARITY_CASES)])
def test_every_exported_graph_has_a_parity_test(precision, cases):
    untested = sorted(EXPORTED_PAIRS - set(cases))
    assert not untested, (f"no {precision} parity test for {untested}: add them to the "
                          f"{precision.upper()}_PARITY_CASES list in tests/lddm_export/test_{'export' if precision == 'fp32' else 'fp16'}.py")
    unknown = sorted(set(cases) - EXPORTED_PAIRS)
    assert not unknown, f"{precision} parity cases {unknown} name graphs that GRAPHS_BY_VARIANT does not export"


def test_every_torch_wrapper_is_an_exported_graph():
    # training.model derives its table from runtimes.spec (a missing wrapper fails at import);
    # this catches the other direction, a wrapper left behind for a graph no variant exports.
    assert set(model._WRAPPERS) == EXPORTED_PAIRS
