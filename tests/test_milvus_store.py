"""The Milvus backend (Milvus Lite, embedded): same ids, paths, vectors and exact results as the
local store; resume rule; ANN recall; clear errors. One Lite file per module (it starts in seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from calibclip.cli.main import main  # noqa: E402
from calibclip.index import Index, open_store  # noqa: E402
from calibclip.models import registry  # noqa: E402
from fakes import PhotoEncoder as FakeEncoder  # noqa: E402
from test_index_helpers import make_photo_folder  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same photo folder in a local index and in a Milvus Lite index."""
    base = tmp_path_factory.mktemp("milvus")
    root = base / "img"
    good, bad = make_photo_folder(root)
    local = Index.build(root, base / "ix", model=FakeEncoder(), batch_size=3, workers=0, calibrate=True, progress=False)
    spec = f"milvus:{base / 'store.db'}"
    milvus = Index.build(root, spec, model=FakeEncoder(), batch_size=3, workers=0, calibrate=True, progress=False)
    yield root, good, bad, local, milvus, spec, base
    milvus.close()
    local.close()


def test_same_ids_paths_vectors_and_skipped_as_local(pair):
    root, good, bad, local, milvus, _, _ = pair
    assert len(milvus) == len(local) == len(good)
    assert milvus.ids.tolist() == local.ids.tolist()
    assert dict((i, str(p)) for i, p in milvus.paths()) == dict((i, str(p)) for i, p in local.paths())
    for name in ("raw", "calibrated"):
        np.testing.assert_array_equal(milvus.features(name), local.features(name))  # both the fp16-rounded values
    assert [(s.relpath, s.reason) for s in milvus.skipped()] == [(s.relpath, s.reason) for s in local.skipped()]
    assert {s.relpath for s in milvus.skipped()} == set(bad)
    rec_l, rec_m = local.get_image(local.ids[0]), milvus.get_image(local.ids[0])
    assert rec_l == rec_m
    info = milvus.info()
    assert info["backend"] == "milvus" and info["count"] == len(good) and info["fingerprint"] == local.fingerprint
    assert info["preprocess"] == local.info()["preprocess"]


def test_exact_and_calibrated_search_equal_local(pair):
    _, good, _, local, milvus, _, _ = pair
    for text in ("a cat", "the rocket on the launch pad at night", "coffee"):
        for cal in (False, True):
            a = [(r.id, r.relpath) for r in local.search(text=text, k=6, calibrate=cal)]
            b = [(r.id, r.relpath) for r in milvus.search(text=text, k=6, calibrate=cal)]
            assert a == b
    ref = local.find(good[1])
    assert [r.id for r in milvus.search(image=ref, text="red", k=4)] == [
        r.id for r in local.search(image=ref, text="red", k=4)
    ]


@pytest.mark.parametrize("kind,params", [("hnsw", {"ef_search": 64}), ("ivf", {"nprobe": 16})])
def test_milvus_ann_recall(tmp_path, kind, params):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((32, 24))
    vecs = (centres[rng.integers(0, 32, 3000)] + 0.6 * rng.standard_normal((3000, 24))).astype(np.float32)
    spec = f"milvus:{tmp_path / 'ann.db'}"
    st = open_store(spec, writable=True)
    st.initialise(24, ["raw"], {"model": "synthetic", "fingerprint": "synthetic", "root": str(tmp_path)})
    for s in range(0, 3000, 1000):
        st.commit_batch(
            {"raw": vecs[s : s + 1000]},
            [{"path": f"{i}.jpg", "size": 1, "mtime_ns": 1, "sha256": "-"} for i in range(s, s + 1000)],
        )
    st.close()
    ix = Index.open(spec)
    queries = vecs[:50] + 0.3 * rng.standard_normal((50, 24)).astype(np.float32)
    _, exact = ix.search_vectors(queries, k=10, ann="exact")
    _, approx = ix.search_vectors(queries, k=10, ann=kind, **params)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.95, recall
    assert (
        ix.store.client.describe_index(ix.store.c_images, "raw")["index_type"]
        == {"hnsw": "HNSW", "ivf": "IVF_FLAT"}[kind]
    )
    with pytest.raises(ValueError, match="do not apply"):
        ix.search_vectors(queries, k=10, ann=kind, **({"nprobe": 3} if kind == "hnsw" else {"ef_search": 3}))
    ix.close()


def test_resume_rule_and_updates(pair, tmp_path):
    import shutil

    root, good, _, local, _, _, base = pair
    work = tmp_path / "img"
    shutil.copytree(root, work, symlinks=True)
    spec = f"milvus:{tmp_path / 'up.db'}"
    first = Index.build(work, spec, model=FakeEncoder(), workers=0, progress=False)
    ids = {p: first.find(p) for p in good}
    first.close()
    again = Index.build(work, spec, model=FakeEncoder(), workers=0, progress=False)
    assert (again.report.added, again.report.updated, again.report.unchanged) == (0, 0, again.report.unchanged)
    assert again.report.added == 0 and {p: again.find(p) for p in good} == ids
    again.close()
    (work / good[0]).unlink()
    shutil.copyfile(root / good[2], work / good[1])  # changed content: new id
    upd = Index.build(work, spec, model=FakeEncoder(), workers=0, progress=False)
    assert (upd.report.removed, upd.report.updated) == (1, 1)
    assert upd.find(good[0]) is None and upd.find(good[1]) not in ids.values() and len(upd) == len(good) - 1
    np.testing.assert_array_equal(upd.features("raw", [upd.find(good[1])]), local.features("raw", [ids[good[2]]]))
    upd.close()


def test_cli_over_milvus_and_clear_errors(pair, tmp_path, capsys, monkeypatch):
    root, good, _, local, _, _, _ = pair
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_ALIASES", {})
    monkeypatch.setattr(registry, "_loaded", True)
    registry.register_model("fake-test", lambda **kw: FakeEncoder(), pretrained="random")
    registry.register_model("fake-other", lambda **kw: FakeEncoder(seed=5), pretrained="random")
    spec = f"milvus:{tmp_path / 'cli.db'}"
    assert main(["index", str(root), "--store", spec, "--model", "fake-test", "--workers", "0", "--quiet"]) == 0
    assert f"{spec}: {len(good)} images indexed" in capsys.readouterr().out
    assert main(["search", spec, "--text", "a cat", "--json", "--top-k", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["id"] for r in got["results"]] == [r.id for r in local.search(text="a cat", k=3)]
    assert main(["info", spec, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == len(good)
    # another model: refused, nothing lost
    assert main(["index", str(root), "--store", spec, "--model", "fake-other", "--quiet"]) == 2
    assert "built with model 'fake-test'" in capsys.readouterr().err
    assert len(Index.open(spec)) == len(good)
    with pytest.raises(ValueError, match="fingerprint"):  # another model of another dimension
        Index.build(root, spec, model=FakeEncoder(dim=8), workers=0, progress=False)
    assert len(Index.open(spec)) == len(good)
    assert main(["search", f"milvus:{tmp_path / 'none.db'}", "--text", "x"]) == 2
    assert "no such Milvus Lite file" in capsys.readouterr().err
    assert main(["search", "milvus:http://127.0.0.1:9", "--text", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot reach Milvus at http://127.0.0.1:9" in err and len(err.splitlines()) == 1
    assert main(["search", "milvus:/tmp/x.txt", "--text", "x"]) == 2
    assert "expected milvus:PATH.db" in capsys.readouterr().err


def test_foreign_or_mismatched_collections_are_refused(tmp_path):
    from pymilvus import DataType, MilvusClient

    db = tmp_path / "foreign.db"
    client = MilvusClient(str(db))
    schema = client.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("raw", DataType.FLOAT_VECTOR, dim=8)
    index = client.prepare_index_params()
    index.add_index("raw", index_type="FLAT", metric_type="COSINE")
    client.create_collection("calibclip_images", schema=schema, index_params=index)
    client.close()
    with pytest.raises(Exception, match="not a calibclip index"):
        Index.build(tmp_path, f"milvus:{db}", model=FakeEncoder(), workers=0, progress=False)
    root = tmp_path / "img"
    make_photo_folder(root)
    spec = f"milvus:{db}#mine"
    Index.build(root, spec, model=FakeEncoder(), workers=0, progress=False).close()
    st = open_store(spec, writable=True)
    st.set_meta({"dim": 8})  # what a collection written for another dimension looks like
    st.close()
    with pytest.raises(Exception, match="vector field 'raw' of dim 16, the index records 8"):
        Index.open(spec)


def test_a_build_killed_between_requests_resumes_with_every_image_once(tmp_path, monkeypatch):
    """A crash after a batch's insert but before its metadata update (the window a kill -9 can hit)."""
    from calibclip.index.stores.milvus import MilvusStore

    root = tmp_path / "img"
    good, bad = make_photo_folder(root)
    spec = f"milvus:{tmp_path / 'crash.db'}"
    real = MilvusStore.set_meta
    calls = {"n": 0}

    def dying(self, values):
        if "next_id" in values and "version" in values:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated crash")
        real(self, values)

    monkeypatch.setattr(MilvusStore, "set_meta", dying)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Index.build(root, spec, model=FakeEncoder(), batch_size=2, workers=0, progress=False)
    monkeypatch.setattr(MilvusStore, "set_meta", real)
    ix = Index.build(root, spec, model=FakeEncoder(), batch_size=2, workers=0, progress=False)
    paths = [ix.get_image(i).relpath for i in ix.ids]
    assert sorted(paths) == sorted(good) and len(set(ix.ids.tolist())) == len(good)
    assert {s.relpath for s in ix.skipped()} == set(bad)
    assert ix.report.added < len(good)  # the committed batches were not re-encoded
    ix.close()


def test_server_errors_are_one_line(tmp_path, capsys):
    """No Milvus server can run here: a wrong token is simulated by a gRPC server that answers every call
    UNAUTHENTICATED with the message Milvus's auth interceptor sends; a socket that accepts and never
    answers, and an HTTP/1.1 server, stand for a wrong address. Each is one line (exit 2 in the CLI)."""
    import socket
    import threading
    from concurrent import futures

    grpc = pytest.importorskip("grpc")

    class Deny(grpc.GenericRpcHandler):
        def service(self, details):
            def abort(request, context):
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "auth check failure, please check username, password or API key are correct",
                )

            return grpc.unary_unary_rpc_method_handler(abort)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((Deny(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        spec = f"milvus:http://127.0.0.1:{port}"
        assert main(["search", spec, "--text", "a cat", "--milvus-token", "root:wrong"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"Milvus at http://127.0.0.1:{port} refused the token" in err, err
        assert "UNAUTHENTICATED" in err
    finally:
        server.stop(0)

    silent, http = socket.socket(), socket.socket()
    held = []
    for s in (silent, http):
        s.bind(("127.0.0.1", 0))
        s.listen(4)

    def answer_http():
        conn, _ = http.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        conn.close()

    threading.Thread(target=lambda: held.append(silent.accept()), daemon=True).start()
    threading.Thread(target=answer_http, daemon=True).start()
    try:
        with pytest.raises(RuntimeError) as err:
            Index.open(f"milvus:http://127.0.0.1:{silent.getsockname()[1]}", store_options={"timeout": 2})
        assert "did not answer as Milvus does" in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(RuntimeError) as err:
            Index.open(f"milvus:http://127.0.0.1:{http.getsockname()[1]}", store_options={"timeout": 2})
        assert "not a Milvus gRPC endpoint" in str(err.value) and "\n" not in str(err.value)
    finally:
        silent.close()
        http.close()
