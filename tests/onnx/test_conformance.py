"""ONNX's own backend node tests (shipped in the onnx wheel) run against cnnc, for the ops
cnnc imports: exactly the list in cnnc.onnx.support, which docs/onnx.md shows."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

pytest.importorskip("onnx", reason="the conformance tests need the onnx package")

import onnx.backend.test

from cnnc.onnx.backend import CnncBackend
from cnnc.onnx.support import NODE_TESTS, markdown

backend_test = onnx.backend.test.BackendTest(CnncBackend, __name__)
for name in NODE_TESTS:
    backend_test.include(f"^{re.escape(name)}_cpu$")
WANTED = {f"{name}_cpu" for name in NODE_TESTS}
with warnings.catch_warnings():  # building onnx's cases casts values to float8 and such
    warnings.simplefilter("ignore", RuntimeWarning)
    CASES = backend_test.test_cases  # built anew on each access: take them once
for case in CASES.values():
    # the runner adds every shipped test, the others skipped: keep only those that run
    for attribute in [a for a in vars(case) if a.startswith("test_") and a not in WANTED]:
        delattr(case, attribute)
globals().update(CASES)


def test_every_listed_test_exists():
    """A name that matches no shipped test would silently run nothing."""
    from onnx.backend.test.loader import load_model_tests

    shipped = {case.name for case in load_model_tests(kind="node")}
    assert [name for name in NODE_TESTS if name not in shipped] == []
    assert len(NODE_TESTS) >= 60


def test_docs_hold_the_generated_matrix():
    docs = (Path(__file__).parents[2] / "docs" / "onnx.md").read_text()
    assert markdown() in docs, "regenerate it: python -m cnnc.onnx.support"
