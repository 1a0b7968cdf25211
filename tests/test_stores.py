"""The store seam (issue 11): a toy in-memory backend registered from this test and used through
the CLI (`calibclip index DIR --store toy:NAME`, `search toy:NAME`, `info toy:NAME`) gives the same
results as the local store; spec parsing and the backend table."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from calibclip.cli.main import main
from calibclip.index import Index, SkippedFile, VectorStore, backend_table, parse_spec, register_store
from calibclip.index import stores as store_table
from calibclip.models import registry
from fakes import PhotoEncoder as FakeEncoder  # noqa: E402
from test_index_helpers import make_photo_folder  # noqa: E402

torch.set_num_threads(1)


class ToyStore(VectorStore):
    """Everything in process memory (a dict of numpy arrays per store name): exact search only."""

    scheme = "toy"
    description = "in-memory numpy arrays (tests)"
    ann_kinds: ClassVar[dict[str, tuple[str, ...]]] = {"exact": (), "flat": ("probes",)}
    default_ann = "flat"
    DATA: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, name: str, writable: bool):
        self.spec, self.writable, self.d = f"toy:{name}", writable, self.DATA[name]

    @classmethod
    def open(cls, location: str, writable: bool = False, options: Mapping[str, Any] | None = None) -> ToyStore:
        if location not in cls.DATA:
            if not writable:
                raise FileNotFoundError(f"no toy store {location!r}")
            cls.DATA[location] = {"meta": {}, "images": {}, "vectors": {}, "skipped": {}, "next": 1}
        return cls(location, writable)

    def meta(self) -> dict[str, Any]:
        return dict(self.d["meta"])

    def set_meta(self, values: Mapping[str, Any]) -> None:
        self.d["meta"].update(values)

    def initialise(self, dim: int, vector_sets: Sequence[str], meta: Mapping[str, Any]) -> None:
        self.d.update(images={}, vectors={})
        self.d["meta"].update(meta, format=1, dim=dim, vector_sets=list(vector_sets), version=1)

    def commit_batch(self, vectors, records, skipped=(), removed=()) -> list[int]:
        for p in [r["path"] for r in records] + [s[0] for s in skipped] + list(removed):
            self.d["skipped"].pop(p, None)
            for i in [i for i, r in self.d["images"].items() if r[1] == p]:
                del self.d["images"][i]
        ids = []
        for j, r in enumerate(records):
            i = self.d["next"]
            self.d["next"] += 1
            self.d["images"][i] = (i, r["path"], r["size"], r["mtime_ns"], r["sha256"], r.get("width"), r.get("height"))
            for name, arr in vectors.items():
                self.d["vectors"][(name, i)] = np.asarray(arr[j], np.float16).astype(np.float32)
            ids.append(i)
        for s in skipped:
            self.d["skipped"][s[0]] = s
        return ids

    def touch_images(self, updates) -> None:
        for p, size, mtime in updates:
            i = self.lookup_path(p)
            self.d["images"][i] = self.d["images"][i][:2] + (size, mtime) + self.d["images"][i][4:]

    def ids(self) -> np.ndarray:
        return np.asarray(sorted(self.d["images"]), dtype=np.int64)

    def count(self) -> int:
        return len(self.d["images"])

    def skipped(self) -> list[SkippedFile]:
        return [SkippedFile(p, s[3], s[4]) for p, s in sorted(self.d["skipped"].items())]

    def images_state(self):
        return {r[1]: (r[2], r[3], r[4], r[0]) for r in self.d["images"].values()}

    def skipped_state(self):
        return {p: (s[1], s[2]) for p, s in self.d["skipped"].items()}

    def records(self, ids):
        return {int(i): self.d["images"][int(i)] for i in ids if int(i) in self.d["images"]}

    def lookup_path(self, relpath: str) -> int | None:
        return next((i for i, r in self.d["images"].items() if r[1] == relpath), None)

    def vectors(self, name: str, ids=None) -> np.ndarray:
        ids = self.ids() if ids is None else ids
        return np.stack([self.d["vectors"][(name, int(i))] for i in ids]) if len(ids) else np.zeros((0, self.dim))

    def search(self, name, queries, k, kind, params=None):
        ids = self.ids()
        g = self.vectors(name, ids)
        sims = queries @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        self.d["searches"] = self.d.get("searches", 0) + 1
        return np.take_along_axis(sims, order, 1).astype(np.float32), ids[order]

    def close(self) -> None:
        pass


@pytest.fixture()
def toy(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(store_table, "_STORES", dict(store_table._STORES))
    monkeypatch.setattr(ToyStore, "DATA", {})
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_ALIASES", {})
    monkeypatch.setattr(registry, "_loaded", True)
    registry.register_model("fake-test", lambda **kw: FakeEncoder(), pretrained="random")
    register_store("toy", ToyStore)
    return ToyStore


def cli_json(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_toy_store_registered_from_the_test_works_through_the_cli(tmp_path, capsys, toy):
    root = tmp_path / "img"
    good, bad = make_photo_folder(root)
    common = ["--model", "fake-test", "--workers", "0", "--quiet", "--json", "--batch-size", "4"]
    rep = cli_json(capsys, ["index", str(root), "--store", "toy:gallery", *common])
    assert rep["count"] == len(good) and rep["skipped"] == len(bad)
    again = cli_json(capsys, ["index", str(root), "--store", "toy:gallery", *common])
    assert (again["added"], again["updated"], again["count"]) == (0, 0, len(good))  # the resume rule, over the toy
    local = cli_json(capsys, ["index", str(root), "--out", str(tmp_path / "ix"), *common])
    assert local["count"] == rep["count"]

    info = cli_json(capsys, ["info", "toy:gallery", "--json", "--skipped"])
    assert info["backend"] == "toy" and info["count"] == len(good)
    assert sorted(s["path"] for s in info["skipped_files"]) == sorted(bad)

    for text in ("a cat", "the rocket on the launch pad"):
        got = cli_json(capsys, ["search", "toy:gallery", "--text", text, "--json", "--top-k", "5"])
        want = cli_json(capsys, ["search", str(tmp_path / "ix"), "--text", text, "--json", "--top-k", "5"])
        assert [(r["id"], r["relpath"]) for r in got["results"]] == [(r["id"], r["relpath"]) for r in want["results"]]
        np.testing.assert_allclose(
            [r["score"] for r in got["results"]], [r["score"] for r in want["results"]], atol=1e-5
        )
    assert toy.DATA["gallery"]["searches"] >= 2  # the toy backend answered, not a fallback
    # the backend's own ANN kind and its per-call parameter reach it (validated by the backend)
    flat = cli_json(capsys, ["search", "toy:gallery", "--text", "a cat", "--json", "--ann", "flat"])
    assert flat["query"]["ann"] == "flat"
    assert main(["search", "toy:gallery", "--text", "a cat", "--ann", "hnsw"]) == 2
    assert "unknown ANN kind 'hnsw' for a toy store" in capsys.readouterr().err
    assert main(["search", "toy:nothing", "--text", "a cat"]) == 2
    assert "no toy store 'nothing'" in capsys.readouterr().err


def test_toy_store_through_the_python_api(tmp_path, toy):
    root = tmp_path / "img"
    good, _ = make_photo_folder(root)
    ix = Index.build(root, "toy:py", model=FakeEncoder(), workers=0, progress=False)
    assert len(ix) == len(good) and ix.store.scheme == "toy"
    ref = ix.find(good[0])
    assert ix.search(image=ref, k=1)[0].id == ref
    np.testing.assert_allclose(ix.features("raw", [ref])[0], toy.DATA["py"]["vectors"][("raw", ref)])
    with pytest.raises(ValueError, match="fingerprint"):
        Index.open("toy:py", model=FakeEncoder(seed=1))


def test_spec_parsing_and_backend_table(tmp_path, toy):
    assert parse_spec(tmp_path / "ix") == ("local", str(tmp_path / "ix"))
    assert parse_spec("some/folder") == ("local", "some/folder")
    assert parse_spec("local:some/folder") == ("local", "some/folder")
    assert parse_spec("milvus:/tmp/a.db") == ("milvus", "/tmp/a.db")
    assert parse_spec("milvus:http://host:19530") == ("milvus", "http://host:19530")
    assert parse_spec("toy:x") == ("toy", "x")
    with pytest.raises(ValueError, match="unknown scheme 'nosuch'"):
        parse_spec("nosuch:thing")
    (tmp_path / "odd:name").mkdir()
    assert parse_spec(str(tmp_path / "odd:name"))[0] == "local"
    with pytest.raises(ValueError, match="names no location"):
        parse_spec("milvus:")
    table = {row["scheme"]: row for row in backend_table()}
    assert {"local", "milvus", "toy"} <= set(table)
    assert table["local"]["ann"] == {"exact": [], "ivf": ["nprobe"], "hnsw": ["ef_search"]}
    assert table["toy"]["ann"]["flat"] == ["probes"]
    from calibclip.cli.main import build_parser

    search = build_parser()._subparsers._group_actions[0].choices["search"]  # type: ignore[union-attr]
    ann = next(a for a in search._actions if a.dest == "ann")
    assert set(ann.choices) >= {"auto", "exact", "ivf", "hnsw", "flat"}
