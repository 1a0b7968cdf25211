"""Index build/update/search through the Python API, with a tiny deterministic encoder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibclip.cli.main import main
from calibclip.data.scan import scan_images
from calibclip.index import Index, Storage
from calibclip.index.search import normalize
from fakes import PhotoEncoder as FakeEncoder
from test_index_helpers import make_photo_folder

torch.set_num_threads(1)
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], dict[str, str]]:
    root = tmp_path_factory.mktemp("photos") / "img"
    good, bad = make_photo_folder(root)
    return root, good, bad


@pytest.fixture(scope="module")
def built(photos, tmp_path_factory) -> Index:
    root, _, _ = photos
    out = tmp_path_factory.mktemp("index") / "ix"
    return Index.build(root, out, model=FakeEncoder(), batch_size=3, workers=1, progress=False)


def fresh_features(encoder: FakeEncoder, paths: list[Path]) -> np.ndarray:
    return encoder.encode(images=paths, batch_size=4)


# --- acceptance: real photos + bad files ------------------------------------------------------------
def test_every_good_image_once_and_every_bad_file_listed(photos, built):
    root, good, bad = photos
    assert len(built) == len(good)
    indexed = sorted(rel for _, rel in ((i, p.relative_to(root).as_posix()) for i, p in built.paths()))
    assert indexed == good
    assert {s.relpath: s.reason for s in built.skipped()} == bad
    assert all(s.message for s in built.skipped())
    info = built.info()
    assert info["count"] == len(good) and info["skipped"] == len(bad) and info["model"] == "fake-test"
    # EXIF orientation 6 swaps the stored 120x60 to a 60x120 (w x h) image
    rec = built.get_image(built.find("rotated.jpg"))
    assert (rec.width, rec.height) == (60, 120)
    assert rec.sha256 and rec.size == (root / "rotated.jpg").stat().st_size


def test_stored_vectors_are_the_encoder_features(photos, built):
    root, good, _ = photos
    ids = [built.find(rel) for rel in good]
    stored = built.features("raw", ids)
    expected = fresh_features(FakeEncoder(), [root / rel for rel in good])
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3)  # float16 storage


def test_scan_survives_symlink_loops(photos):
    root, good, bad = photos
    scan = scan_images(root)
    assert sorted(f.relpath for f in scan.files) == sorted(
        set(good) | {"corrupt.jpg", "notes.png", "zero.jpg", "sub/bomb.png"}
    )
    assert scan.problems["loop_a.jpg"][0] == "unreadable" and "loop" in scan.problems["loop_a.jpg"][1]


# --- search ---------------------------------------------------------------------------------------------
def brute_force(index: Index, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    g = normalize(index.features("raw")).numpy()
    s = g @ normalize(query).numpy()[0]
    order = np.argsort(-s, kind="stable")[:k]
    return s[order], index.ids[order]


def test_text_search_equals_brute_force(built):
    q = built.encode_text("a cat on a sofa")["raw"]
    results = built.search(text="a cat on a sofa", k=5)
    scores, ids = brute_force(built, q.numpy()[None], 5)
    assert [r.id for r in results] == ids.tolist()
    np.testing.assert_allclose([r.score for r in results], scores, atol=1e-5)
    assert [r.rank for r in results] == [1, 2, 3, 4, 5]
    assert all(Path(r.path).is_file() and r.path.endswith(r.relpath) for r in results)


def test_image_query_by_id_path_and_file_agree(photos, built):
    root, _, _ = photos
    ref = built.find("chelsea.png")
    by_id = built.search(image=ref, k=3)
    by_rel = built.search(image="chelsea.png", k=3)
    by_abs = built.search(image=str(root / "chelsea.png"), k=3)
    assert by_id[0].id == ref and [r.id for r in by_id] == [r.id for r in by_rel] == [r.id for r in by_abs]
    outside = built.search(image=Image.open(root / "chelsea.png"), k=1)
    assert outside[0].id == ref
    with pytest.raises(FileNotFoundError, match="neither an image of this index"):
        built.search(image="no/such/file.jpg")
    with pytest.raises(KeyError):
        built.search(image=10**6)


def test_composed_query_is_normalised_sum_and_excludes_reference(built):
    ref = built.find("coffee.jpg")
    text = "make it brighter"
    results = built.search(image=ref, text=text, k=4)
    t = built.encode_text(text)["raw"][None]
    from calibclip.composed import normalized_sum
    from calibclip.composed.baselines import sum_text_weight

    # no Combiner for this encoder: the sum of the L2-normalised features with the encoder's text weight
    expected_query = normalized_sum(torch.from_numpy(built.features("raw", [ref])), t, sum_text_weight(built.encoder))
    scores, ids = brute_force(built, expected_query.numpy(), len(built))
    ids = [i for i in ids.tolist() if i != ref][:4]
    assert [r.id for r in results] == ids
    kept = built.search(image=ref, text=text, k=len(built), exclude_reference=False)
    assert ref in [r.id for r in kept]


def test_concurrent_searches_are_consistent(built):
    queries = [f"query number {i}" for i in range(8)]
    expected = {q: [r.id for r in built.search(text=q, k=5)] for q in queries}
    errors: list[BaseException] = []
    got: dict[str, list[int]] = {}

    def work(q: str) -> None:
        try:
            for _ in range(5):
                got[q] = [r.id for r in built.search(text=q, k=5)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(q,)) for q in queries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == expected


def test_lookups_and_sample(built):
    ids = built.ids.tolist()
    assert sorted(built.sample(100, seed=1)) == sorted(ids)
    assert built.sample(3, seed=7) == built.sample(3, seed=7) and len(set(built.sample(3, seed=7))) == 3
    assert built.path_of(ids[0]) == built.get_image(ids[0]).path
    assert ids[0] in built and -5 not in built
    with pytest.raises(KeyError):
        built.get_image(-5)
    assert built.find("../etc/passwd") is None


# --- incremental updates, model identity ------------------------------------------------------------
def test_incremental_add_modify_touch_delete(photos, tmp_path):
    src, good, _ = photos
    root = tmp_path / "img"
    shutil.copytree(src, root, symlinks=True)
    out = tmp_path / "ix"
    enc = FakeEncoder()
    first = Index.build(root, out, model=enc, batch_size=4, workers=0, progress=False)
    before = {p.relative_to(root).as_posix(): i for i, p in first.paths()}
    first.close()

    Image.open(root / "chelsea.png").rotate(90).save(root / "sub" / "new.png")  # added
    flipped = Image.open(root / "astronaut.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped.save(root / "astronaut.png")  # changed
    st = (root / "coffee.jpg").stat()
    os.utime(root / "coffee.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched, same bytes
    (root / "horse.tiff").unlink()  # deleted
    (root / "zero.jpg").unlink()  # a bad file deleted too
    second = Index.build(root, out, model=enc, batch_size=4, workers=0, progress=False)
    r = second.report
    assert (r.added, r.updated, r.removed) == (1, 1, 1)
    assert r.count == len(good) and len(second) == len(good)
    after = {p.relative_to(root).as_posix(): i for i, p in second.paths()}
    assert "horse.tiff" not in after and "sub/new.png" in after
    assert after["coffee.jpg"] == before["coffee.jpg"] and after["chelsea.png"] == before["chelsea.png"]
    assert after["astronaut.png"] != before["astronaut.png"]
    assert "zero.jpg" not in {s.relpath for s in second.skipped()}
    rels = sorted(after)
    np.testing.assert_allclose(
        second.features("raw", [after[p] for p in rels]),
        fresh_features(enc, [root / p for p in rels]),
        rtol=2e-3,
        atol=2e-3,
    )
    # search never returns the deleted image; the mtime of the touched file is recorded
    assert "horse.tiff" not in [x.relpath for x in second.search(text="a horse", k=len(second))]
    assert second.get_image(after["coffee.jpg"]).mtime_ns == (root / "coffee.jpg").stat().st_mtime_ns
    third = Index.build(root, out, model=enc, batch_size=4, workers=0, progress=False)
    assert (third.report.added, third.report.updated, third.report.removed) == (0, 0, 0)


def test_other_model_is_refused(built):
    with pytest.raises(ValueError, match="fingerprint"):
        Index.open(built.directory, model=FakeEncoder(seed=1))
    with pytest.raises(ValueError, match="built with model"):
        Index.build(built.images_dir, built.directory, model=FakeEncoder(seed=1), workers=0, progress=False)
    assert len(Index.open(built.directory, model=FakeEncoder())) == len(built)


def test_uncommitted_tail_is_ignored_and_truncated(photos, tmp_path):
    root, good, _ = photos
    out = tmp_path / "ix"
    Index.build(root, out, model=FakeEncoder(), batch_size=5, workers=0, progress=False).close()
    st = Storage(out)
    vec = st.vector_path("raw")
    committed = vec.stat().st_size
    st.close()
    with open(vec, "ab") as f:  # what a kill between the vector write and the SQLite commit leaves
        f.write(b"\x01" * 16 * 2 * 3)
    reader = Index.open(out, model=FakeEncoder())
    assert len(reader) == len(good) and reader.features("raw").shape == (len(good), 16)
    writer = Storage(out, writable=True)  # recovery on the next writable open
    assert vec.stat().st_size == committed
    writer.close()


KILL_SCRIPT = """
import torch
torch.set_num_threads(1)
from fakes import PhotoEncoder as FakeEncoder
from calibclip.index import Index
Index.build({src!r}, {out!r}, model=FakeEncoder(delay=0.15), batch_size=2, workers=1, progress=False)
"""


def test_kill9_during_indexing_then_resume(photos, tmp_path, capsys):
    root, good, bad = photos
    out = tmp_path / "ix"
    script = KILL_SCRIPT.format(src=str(root), out=str(out))
    log = open(tmp_path / "stderr.txt", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env={**os.environ, "CALIBCLIP_NO_PROGRESS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])},
        stderr=log,
    )
    deadline = time.time() + 60
    rows = 0
    while time.time() < deadline and proc.poll() is None:
        if (out / "meta.sqlite").exists():
            try:
                st = Storage(out)
                rows = st.rows
                st.close()
            except Exception:  # noqa: BLE001 - schema not written yet
                rows = 0
            if rows >= 4:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert 4 <= rows < len(good), f"the kill must land mid-run; child stderr: {(tmp_path / 'stderr.txt').read_text()}"
    st = Storage(out)
    committed = st.count()
    st.close()
    resumed = Index.build(root, out, model=FakeEncoder(), batch_size=3, workers=0, progress=False)
    assert resumed.report.added == len(good) - committed
    rels = [p.relative_to(root).as_posix() for _, p in resumed.paths()]
    assert sorted(rels) == good and len(set(rels)) == len(rels)
    assert {s.relpath for s in resumed.skipped()} == set(bad)
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["count"], info["skipped"]) == (len(good), len(bad))
    ids = [resumed.find(p) for p in good]
    np.testing.assert_allclose(
        resumed.features("raw", ids), fresh_features(FakeEncoder(), [root / p for p in good]), rtol=2e-3, atol=2e-3
    )


# --- calibrated search ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibrated(photos, tmp_path_factory) -> Index:
    root, _, _ = photos
    out = tmp_path_factory.mktemp("calibrated") / "ix"
    return Index.build(
        root,
        out,
        model=FakeEncoder(),
        batch_size=4,
        workers=0,
        calibrate=True,
        calibration={"top_k": 5},
        progress=False,
    )


def test_calibrated_search_equals_full_fused_ranking(calibrated):
    text = "a small cat sitting on the red sofa"
    cal = calibrated.calibrator()
    q = cal.text_features([text])
    gallery = {n: torch.from_numpy(calibrated.features(n)) for n in ("raw", "calibrated")}
    fused = cal.scores(q, gallery)[0].numpy()
    expected = calibrated.ids[np.argsort(-fused, kind="stable")][:8].tolist()
    got = calibrated.search(text=text, k=8, calibrate=True)
    assert [r.id for r in got] == expected
    np.testing.assert_allclose([r.score for r in got[:5]], np.sort(fused)[::-1][:5], atol=1e-5)


def test_calibration_noop_gives_plain_ranking(photos, tmp_path):
    root, _, _ = photos
    ix = Index.build(
        root, tmp_path / "ix", model=FakeEncoder(), workers=0, calibrate=True, calibration={"lam": 1.0}, progress=False
    )
    for text in ("a cat", "the rocket on the launch pad at night"):
        assert [r.id for r in ix.search(text=text, k=6, calibrate=True)] == [r.id for r in ix.search(text=text, k=6)]


def test_calibrate_needs_calibrated_vectors(built):
    with pytest.raises(ValueError, match="calibrate=True") as err:
        built.search(text="a cat", calibrate=True)
    assert "--" not in str(err.value)  # the library names its parameters; the CLI maps them to flags


def test_library_messages_name_parameters_not_cli_flags(built, tmp_path):
    """Regression (issue 11): index/core.py spoke of --top-k, --image, `calibclip index --calibrate`."""
    cases = [
        (ValueError, lambda: built.search(text="a cat", k=0), "k must be >= 1"),
        (ValueError, lambda: built.search(), "text, image or both"),
        (FileNotFoundError, lambda: built.search(image=tmp_path / "nope.png"), "nor an existing file"),
        (ValueError, lambda: built.features("calibrated"), "calibrate=True"),
        (ValueError, lambda: Index.open(built.directory, model=FakeEncoder(seed=1)), "model=None"),
        (ValueError, lambda: built.search(text="a cat", ann="ivf", ef_search=3), "do not apply"),
    ]
    for exc, call, words in cases:
        with pytest.raises(exc, match=words) as err:
            call()
        assert "--" not in str(err.value), str(err.value)


# --- approximate search ----------------------------------------------------------------------------------
def synthetic_index(out: Path, vectors: np.ndarray, start: int = 0) -> None:
    st = Storage(out, writable=True)
    if st.get("format") is None:
        st.initialise(
            vectors.shape[1],
            ["raw"],
            {
                "model": "synthetic",
                "model_spec": None,
                "fingerprint": "synthetic",
                "precision": "fp32",
                "root": str(out),
            },
        )
    for s in range(0, len(vectors), 1000):
        chunk = vectors[s : s + 1000]
        recs = [
            {"path": f"img{start + s + i:06d}.jpg", "size": 1, "mtime_ns": 1, "sha256": "-"} for i in range(len(chunk))
        ]
        st.commit_batch({"raw": chunk}, recs)
    st.close()


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, d))
    return (centres[rng.integers(0, 64, n)] + 0.6 * rng.standard_normal((n, d))).astype(np.float32)


@pytest.mark.parametrize("kind,param", [("ivf", {"nprobe": 16}), ("hnsw", {"ef_search": 64})])
def test_ann_recall_and_rebuild_when_index_changes(tmp_path, kind, param):
    out = tmp_path / "ix"
    synthetic_index(out, clustered(4000, 32, 0))
    queries = clustered(40, 32, 1)
    ix = Index.open(out)
    _, exact = ix.search_vectors(queries, k=10, ann="exact")
    _, approx = ix.search_vectors(queries, k=10, ann=kind, **param)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.9, recall
    saved = out / "ann" / f"raw.{kind}.faiss"
    assert saved.exists()
    ix.close()
    extra = clustered(500, 32, 2) * 3.0
    synthetic_index(out, extra, start=4000)  # index changed: the ANN file is stale and rebuilt
    ix = Index.open(out)
    _, hits = ix.search_vectors(extra[:5], k=1, ann=kind, **param)
    assert [int(i) for i in hits[:, 0]] == [ix.find(f"img{4000 + j:06d}.jpg") for j in range(5)]
    assert len(ix) == 4500


def test_auto_uses_exact_below_threshold(tmp_path):
    out = tmp_path / "ix"
    synthetic_index(out, clustered(1000, 8, 3))
    ix = Index.open(out)
    ix.search_vectors(clustered(2, 8, 4), k=5, ann="auto")
    assert not (out / "ann").exists()
    with pytest.raises(ValueError, match="unknown ANN kind"):
        ix.search_vectors(clustered(2, 8, 4), k=5, ann="lsh")


# --- composed search with a Combiner ---------------------------------------------------------------------
def test_attached_combiner_is_used_for_composed_queries(photos, tmp_path):
    from calibclip.composed import Combiner, build_combining, save_combiner

    root, _, _ = photos
    enc = FakeEncoder()
    torch.manual_seed(0)
    ckpt = save_combiner(tmp_path / "run" / "best.pt", Combiner(16, 32, 64), enc.fingerprint())
    ix = Index.build(root, tmp_path / "ix", model=enc, workers=0, combiner=ckpt, progress=False)
    assert ix.combiner is not None and ix.info()["combiner"]
    ref, text = ix.find("astronaut.png"), "wearing a red helmet"
    combine = build_combining("combiner", ckpt)
    query = combine(torch.from_numpy(ix.features("raw", [ref])), ix.encode_text(text)["raw"][None])
    _, ids = brute_force(ix, query.numpy(), len(ix))
    assert [r.id for r in ix.search(image=ref, text=text, k=5)] == [i for i in ids.tolist() if i != ref][:5]
    plain = Index.build(root, tmp_path / "plain", model=enc, workers=0, progress=False)
    assert plain.combiner is None
    plain.attach_combiner(ckpt)
    composed = [r.id for r in ix.search(image=ref, text=text, k=5)]
    assert [r.id for r in plain.search(image=ref, text=text, k=5)] == composed
    other = save_combiner(tmp_path / "run" / "other.pt", Combiner(16, 32, 64), FakeEncoder(seed=3).fingerprint())
    with pytest.raises(ValueError, match="trained on features of encoder"):
        plain.attach_combiner(other)


def test_empty_folder_and_bad_out_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    ix = Index.build(tmp_path / "empty", tmp_path / "ix", model=FakeEncoder(), workers=0, progress=False)
    assert len(ix) == 0 and ix.search(text="anything", k=5) == [] and ix.info()["count"] == 0
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not an index"):
        Index.build(tmp_path / "empty", tmp_path / "notes", model=FakeEncoder(), workers=0, progress=False)


def test_compaction_keeps_ids_and_vectors(tmp_path):
    out = tmp_path / "ix"
    vecs = clustered(10, 8, 5)
    synthetic_index(out, vecs)
    before = Index.open(out)
    ids = {p.name: i for i, p in before.paths()}
    before.close()
    st = Storage(out, writable=True)
    gone = [f"img{j:06d}.jpg" for j in (0, 3, 4, 7, 9)]
    st.commit_batch({}, [], removed=gone)
    assert (st.rows, st.count()) == (10, 5)
    gen = st.generation
    st.compact()
    assert (st.rows, st.count(), st.generation) == (5, 5, gen + 1)
    assert sorted(p.name for p in (out / "vectors").iterdir()) == ["raw.g1.f16", "raw.g1.norm.f32"]
    st.close()
    after = Index.open(out)
    keep = [j for j in range(10) if f"img{j:06d}.jpg" not in gone]
    assert {p.name: i for i, p in after.paths()} == {f"img{j:06d}.jpg": ids[f"img{j:06d}.jpg"] for j in keep}
    got = after.features("raw", [ids[f"img{j:06d}.jpg"] for j in keep])
    np.testing.assert_allclose(got, vecs[keep], rtol=1e-3, atol=1e-3)
    _, hit = after.search_vectors(vecs[keep], k=1)
    assert hit[:, 0].tolist() == [ids[f"img{j:06d}.jpg"] for j in keep]
