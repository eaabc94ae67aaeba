"""A GPU session runs the tests that fault the GPU first: under MPS a fault takes down every
client of the server, the test process too once an in-process GPU test has made its context (on
the H100 at 0a98ffa an alphabetical `tests/gpu` run failed them after 13 passes, then hung)."""

from __future__ import annotations

from types import SimpleNamespace

from tests import conftest


def _items(*nodeids: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(nodeid=n, keywords={"gpu": True}, add_marker=lambda m: None)
            for n in nodeids]  # fmt: skip


NODES = (
    "tests/gpu/test_broker_cuda.py::test_a",
    "tests/gpu/test_gather_cuda.py::test_b",
    "tests/gpu/test_gpu_faults.py::test_fault_1",
    "tests/gpu/test_gpu_faults.py::test_fault_2",
    "tests/gpu/test_graphs_cuda.py::test_c",
)


def test_with_cuda_the_fault_tests_come_first_and_the_rest_keep_their_order(monkeypatch):
    monkeypatch.setattr(conftest, "cuda_available", lambda: True)
    items = _items(*NODES)
    conftest.pytest_collection_modifyitems(None, items)  # type: ignore[arg-type]
    assert [i.nodeid for i in items] == [NODES[2], NODES[3], NODES[0], NODES[1], NODES[4]]


def test_without_cuda_the_order_stays_and_gpu_tests_are_skipped(monkeypatch):
    monkeypatch.setattr(conftest, "cuda_available", lambda: False)
    marked: list[object] = []
    items = _items(*NODES)
    for i in items:
        i.add_marker = marked.append
    conftest.pytest_collection_modifyitems(None, items)  # type: ignore[arg-type]
    assert [i.nodeid for i in items] == list(NODES) and len(marked) == len(NODES)
