"""Dynamic micro-batching of text queries in the web service (issue 14, Serving): batched results
equal unbatched ones, a full queue is answered 503 with Retry-After, a failing item fails alone.
No timed assertions: the tests hold the model lock to make batches form deterministically."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from web_support import web_app, web_data  # noqa: E402,F401

WAIT_S = 60


def _wait_for(cond, what: str) -> None:
    deadline = time.time() + WAIT_S
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


# ---- the batcher itself ------------------------------------------------------------------------
def test_concurrent_items_share_one_batch() -> None:
    from calibclip.web.batching import BatchSettings, MicroBatcher

    gate = threading.Event()
    sizes: list[int] = []

    def fn(items: list[int]) -> list[int]:
        gate.wait(WAIT_S)
        sizes.append(len(items))
        return [x * 10 for x in items]

    b = MicroBatcher(fn, BatchSettings(window_ms=0, max_batch=64, max_queue=64, timeout_s=WAIT_S))
    try:
        with ThreadPoolExecutor(9) as pool:
            futs = [pool.submit(b.submit, i) for i in range(9)]
            _wait_for(lambda: b.submitted == 9, "9 submissions")
            gate.set()
            assert [f.result() for f in futs] == [i * 10 for i in range(9)]
        assert sum(sizes) == 9 and len(sizes) <= 2  # the first batch, then everything that queued behind it
        assert b.batches == len(sizes) and b.items == 9
    finally:
        b.close()


def test_full_queue_is_refused_with_retry_after() -> None:
    from calibclip.web.batching import BatchSettings, MicroBatcher, Overloaded

    gate = threading.Event()
    b = MicroBatcher(
        lambda items: [gate.wait(WAIT_S) and x for x in items],
        BatchSettings(window_ms=0, max_batch=1, max_queue=2, timeout_s=WAIT_S),
    )
    try:
        with ThreadPoolExecutor(3) as pool:
            first = pool.submit(b.submit, 1)
            _wait_for(lambda: b.submitted == 1 and b.pending() == 0, "the worker to take item 1")
            queued = [pool.submit(b.submit, i) for i in (2, 3)]
            _wait_for(lambda: b.pending() == 2, "a full queue")
            with pytest.raises(Overloaded, match="already waiting") as info:
                b.submit(4)
            assert info.value.retry_after >= 1
            gate.set()
            assert first.result() == 1 and [f.result() for f in queued] == [2, 3]
    finally:
        b.close()


def test_request_timeout_and_failing_items() -> None:
    from calibclip.web.batching import BatchSettings, MicroBatcher, Overloaded

    gate = threading.Event()
    slow = MicroBatcher(
        lambda items: [gate.wait(WAIT_S) and x for x in items],
        BatchSettings(window_ms=0, max_batch=4, max_queue=4, timeout_s=0.05),
    )
    try:
        with pytest.raises(Overloaded, match="not answered within"):
            slow.submit(1)
    finally:
        gate.set()
        slow.close()

    def fn(items: list[str]) -> list[str]:
        if "bad" in items:
            raise ValueError("bad item")
        return [x.upper() for x in items]

    gate2 = threading.Event()
    b = MicroBatcher(
        lambda items: (gate2.wait(WAIT_S), fn(items))[1],
        BatchSettings(window_ms=0, max_batch=8, max_queue=8, timeout_s=WAIT_S),
    )
    try:
        with ThreadPoolExecutor(4) as pool:
            futs = {x: pool.submit(b.submit, x) for x in ("a", "bad", "c", "d")}
            _wait_for(lambda: b.submitted == 4, "4 submissions")
            gate2.set()
            assert futs["a"].result() == "A" and futs["c"].result() == "C" and futs["d"].result() == "D"
            with pytest.raises(ValueError, match="bad item"):
                futs["bad"].result()
    finally:
        b.close()


@pytest.mark.parametrize("kwargs", [{"window_ms": -1}, {"max_batch": 0}, {"max_queue": 0}, {"timeout_s": 0}])
def test_settings_are_validated(kwargs: dict) -> None:
    from calibclip.web.batching import BatchSettings

    with pytest.raises(ValueError, match="must be"):
        BatchSettings(**kwargs)


# ---- in the web service ------------------------------------------------------------------------------
def _served(web_app, max_queue: int):  # noqa: F811
    """The test index served with micro-batching (sharing the already opened index)."""
    from calibclip.web.batching import BatchSettings
    from calibclip.web.service import ServedIndex

    base = next(iter(web_app.state.indexes.values()))
    return ServedIndex(
        "batched",
        base.index,
        base.suggestions,
        base.annotations,
        batching=BatchSettings(window_ms=0, max_batch=32, max_queue=max_queue, timeout_s=WAIT_S),
    )


@pytest.fixture()
def batched(web_app):  # noqa: F811
    ix = _served(web_app, max_queue=32)
    yield ix
    ix.close()


@pytest.fixture()
def batched_small_queue(web_app):  # noqa: F811
    ix = _served(web_app, max_queue=2)
    yield ix
    ix.close()


def test_batched_results_equal_unbatched(batched, web_data) -> None:  # noqa: F811
    from calibclip.index import Index

    index = Index.open(web_data["index"])
    ids = index.sample(2, seed=1)
    queries = [
        ("a cup of coffee", None, False),
        ("a cat on a sofa", None, True),
        ("a rocket", None, False),
        ("in black and white", ids[0], False),
        ("a horse instead", ids[1], True),
        ("a cup of coffee", None, False),
        ("a person in a space suit", None, True),
    ]
    n = len(queries)
    batcher = batched.batcher
    before = batcher.batches
    with ThreadPoolExecutor(n) as pool:
        with batched.lock:  # hold the model: the queries queue up and are encoded together
            futs = [pool.submit(batched.search, t, img, 5, cal) for t, img, cal in queries]
            _wait_for(lambda: batcher.submitted >= n, "all queries queued")
        results = [f.result() for f in futs]
    assert batcher.batches - before <= 2  # 7 queries, at most 2 encoder batches
    for (text, image, cal), got in zip(queries, results):
        want = index.search(text=text, image=image, k=5, calibrate=cal)
        assert [h.id for h in got] == [h.id for h in want], (text, image, cal)
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-4, atol=1e-5)


def test_full_queue_answers_503_with_retry_after(batched_small_queue, tmp_path) -> None:
    batched = batched_small_queue
    from calibclip.web.app import WebConfig, create_app

    app = create_app(WebConfig(index_dirs=[], upload_dir=str(tmp_path)), indexes=[batched])
    client = TestClient(app, base_url="http://localhost", raise_server_exceptions=False)
    batcher = batched.batcher
    start = batcher.submitted
    with ThreadPoolExecutor(3) as pool:
        with batched.lock:  # the encoder is busy
            first = pool.submit(client.post, "/api/search", json={"text": "a cat", "k": 2})
            _wait_for(lambda: batcher.submitted == start + 1 and batcher.pending() == 0, "a batch in progress")
            queued = [pool.submit(client.post, "/api/search", json={"text": f"a dog {i}", "k": 2}) for i in (1, 2)]
            _wait_for(lambda: batcher.pending() == 2, "a full queue")
            r = client.post("/api/search", json={"text": "one more", "k": 2})
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert "busy" in r.json()["detail"]
        assert first.result().status_code == 200
        assert all(f.result().status_code == 200 for f in queued)
    doc = client.get("/openapi.json").json()
    assert "503" in doc["paths"]["/api/search"]["post"]["responses"]


def test_same_text_same_vector_whatever_the_batch(batched) -> None:
    """A batched forward's rows differ from a lone forward's in the last bits; recent texts are
    cached so that one query always gets one vector (and one answer)."""
    import torch

    alone = batched.batcher.submit(("a red motorcycle", False))
    batcher = batched.batcher
    with ThreadPoolExecutor(4) as pool:
        with batched.lock:
            start = batcher.submitted
            futs = [
                pool.submit(batcher.submit, (t, False))
                for t in ("a very long query about a motorcycle in a garage", "x", "a red motorcycle", "y z")
            ]
            _wait_for(lambda: batcher.submitted == start + 4, "4 submissions")
        together = futs[2].result()
    assert torch.equal(alone["raw"], together["raw"])
