"""Green contexts on a real GPU (run under MPS at 100%, never with an MPS percentage set).

The split gives equal groups of 8 SMs; a share over two groups has 16 SMs, runs CuPy work
correctly on primary-context memory and never leaves its SMs; a resize changes the SM count in
place; two fresh processes see the same split, SM for SM.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from common.errors import InvalidArgument

pytestmark = pytest.mark.gpu

DEVICE = 0


@pytest.fixture
def share() -> Iterator[object]:
    from services.green.context import GreenShare

    s = GreenShare.create(DEVICE, [0, 1])
    yield s
    s.close()


def matmul_is_correct(stream: object) -> bool:
    import cupy

    rng = np.random.default_rng(7)
    a_host = rng.standard_normal((512, 384), dtype=np.float32)
    b_host = rng.standard_normal((384, 256), dtype=np.float32)
    # operands come from the primary context (CuPy's pool), the work runs on the green stream
    a, b = cupy.asarray(a_host), cupy.asarray(b_host)
    cupy.cuda.get_current_stream().synchronize()
    with stream:  # type: ignore[attr-defined]
        c = a @ b
        d = cupy.tanh(c)  # an elementwise kernel too, not only cuBLAS
    stream.synchronize()  # type: ignore[attr-defined]
    want = a_host @ b_host
    return bool(
        np.allclose(c.get(), want, rtol=1e-3, atol=1e-3)
        and np.allclose(d.get(), np.tanh(want), rtol=1e-3, atol=1e-3)
    )


def test_split_gives_equal_groups_of_8_sms():
    from services.green.split import split_device

    split = split_device(DEVICE, 8)
    info = split.info
    assert info.n_groups > 1
    assert set(info.group_sms) == {8}
    assert info.n_groups * 8 + info.remainder_sms == info.total_sms
    assert info.uuid.startswith("GPU-")


def test_share_over_two_groups_has_16_sms_and_computes_correctly(share):
    assert share.multiprocessors == 16
    assert share.groups == (0, 1)
    assert matmul_is_correct(share.stream)


def test_kernels_on_the_share_stay_on_its_groups_sms(share):
    from services.green.context import build_slice
    from services.green.smid import observed_sm_ids

    per_group = []
    for g in (0, 1, 2):
        piece = build_slice(share.split, (g,))
        try:
            per_group.append(set(observed_sm_ids(piece.stream, DEVICE)))
        finally:
            piece.close()
    # %smid is numbered within a green context under MPS, so only counts are comparable
    assert all(len(ids) == 8 for ids in per_group)
    assert len(set(observed_sm_ids(share.stream, DEVICE))) == 16


def test_resize_from_2_to_6_groups_in_place(share):
    old = share.current
    apply_us = share.resize(range(6))
    assert apply_us > 0
    assert share.multiprocessors == 48
    assert share.groups == tuple(range(6))
    assert old.closed and not share.current.closed
    assert matmul_is_correct(share.stream)

    pending = share.prepare([6, 7])
    assert share.multiprocessors == 48  # nothing switches before commit
    share.commit(pending)
    assert share.multiprocessors == 16 and share.groups == (6, 7)
    assert matmul_is_correct(share.stream)


def test_switch_commits_a_green_slice_only_after_the_batch(share):
    switch = share.switch()
    batch_slice = switch.begin_batch()
    fut = switch.request(share.prepare(range(4)))
    assert not fut.done() and not batch_slice.closed
    assert matmul_is_correct(batch_slice.stream)
    switch.end_batch()
    new = fut.result(timeout=5)
    assert batch_slice.closed and share.current is new and new.multiprocessors == 32


def test_bad_groups_are_refused(share):
    n = share.split.info.n_groups
    for bad in ([], [0, 0], [n], [-1]):
        with pytest.raises(InvalidArgument):
            share.prepare(bad)
    assert share.multiprocessors == 16


def test_split_is_identical_in_two_fresh_processes():
    from services.green.split import verify_across_processes

    fp = verify_across_processes(DEVICE, processes=2, timeout_s=240)
    assert fp["n_groups"] > 1 and fp["sms_per_group"] == 8
    counts = fp["group_sm_counts"]
    assert counts == [8] * fp["n_groups"]
