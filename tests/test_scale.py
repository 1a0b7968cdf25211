"""Scale-out (issue 13): the Ray engine and the Milvus store give the same index as the local
engine and store: (local, local), (ray, local), (local, milvus), (ray, milvus) on ~20 generated
images — identical ids, paths, records, skipped files, vectors and exact top-10. Ray runs a local
2-CPU cluster shared by the module; Milvus is Milvus Lite."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("pymilvus")

from calibclip.index import Index  # noqa: E402
from fakes import PhotoEncoder as FakeEncoder  # noqa: E402

torch.set_num_threads(1)
QUERIES = ["a red square", "blue sky", "green field at dawn", "a dark room", "yellow", "white snow", "cat"]


def generated_folder(root: Path, n: int = 20) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    good = []
    for i in range(n):
        pixels = (rng.random((24 + i, 40, 3)) * rng.random(3) * 255).astype(np.uint8)
        rel = f"{'sub/' if i % 3 == 0 else ''}img{i:02d}.{'png' if i % 2 else 'jpg'}"
        (root / rel).parent.mkdir(exist_ok=True)
        Image.fromarray(pixels).save(root / rel)
        good.append(rel)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    return good, ["broken.jpg", "empty.png"]


@pytest.fixture(scope="module")
def ray_cluster():
    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level="ERROR",
            runtime_env={"env_vars": {"PYTHONPATH": ":".join(p for p in sys.path if p)}},
        )
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def four_ways(tmp_path_factory, ray_cluster):
    base = tmp_path_factory.mktemp("scale")
    root = base / "img"
    good, bad = generated_folder(root)
    out = {}
    for engine in ("local", "ray"):
        for store in ("local", "milvus"):
            spec = str(base / f"{engine}-ix") if store == "local" else f"milvus:{base / f'{engine}.db'}"
            out[engine, store] = Index.build(
                root,
                spec,
                model=FakeEncoder(),
                batch_size=4,
                workers=0,
                calibrate=True,
                engine=engine,
                engine_options={"num_workers": 1},
                progress=False,
            )
    yield root, good, bad, out
    for ix in out.values():
        ix.close()


def test_four_ways_give_the_same_index(four_ways):
    root, good, bad, out = four_ways
    ref = out["local", "local"]
    assert len(ref) == len(good) and {s.relpath for s in ref.skipped()} == set(bad)
    for key, ix in out.items():
        assert ix.ids.tolist() == ref.ids.tolist(), key
        assert [ix.get_image(i) for i in ix.ids] == [ref.get_image(i) for i in ref.ids], key
        assert [(s.relpath, s.reason) for s in ix.skipped()] == [(s.relpath, s.reason) for s in ref.skipped()], key
        for name in ("raw", "calibrated"):
            np.testing.assert_array_equal(ix.features(name), ref.features(name))  # both fp16-rounded values
        for q in QUERIES:
            assert [r.id for r in ix.search(text=q, k=10)] == [r.id for r in ref.search(text=q, k=10)], (key, q)
            assert [r.id for r in ix.search(text=q, k=10, calibrate=True)] == [
                r.id for r in ref.search(text=q, k=10, calibrate=True)
            ], (key, q)
        assert ix.report.added == len(good) and ix.report.skipped == len(bad), key


def test_ray_engine_resume_rule(four_ways, tmp_path):
    root, good, _, out = four_ways
    again = Index.build(
        root, out["ray", "local"].location, model=FakeEncoder(), batch_size=4, engine="ray", progress=False
    )
    assert (again.report.added, again.report.updated) == (0, 0)
    assert again.ids.tolist() == out["ray", "local"].ids.tolist()
    again.close()


def allow_ray_node(guard) -> None:
    """The tests' network guard refuses this machine's own address, where the local Ray's GCS listens;
    the engine's watchdog pings it every 2 s and would end a Ray run inside a test after 6 s."""
    guard.allow(ray.get_runtime_context().gcs_address.rpartition(":")[0])


def test_ray_engine_skips_files_that_vanish_mid_run(tmp_path, ray_cluster, monkeypatch, _no_outward_network):
    """A file deleted after listing and one deleted after decoding (in the Ray decode task, before its
    hash is taken) are `missing` skips, the other images indexed: the same outcome as the local engine."""
    import calibclip.index.build as build
    from fakes import DeleteAfterDecoding

    allow_ray_node(_no_outward_network)

    real_scan = build.scan_images

    def scan_then_delete(root, *args, **kwargs):  # the file is listed, then vanishes before decoding
        found = real_scan(root, *args, **kwargs)
        (Path(root) / "img05.png").unlink()
        return found

    monkeypatch.setattr(build, "scan_images", scan_then_delete)
    out = {}
    for engine in ("local", "ray"):
        root = tmp_path / engine
        good, bad = generated_folder(root, n=8)
        enc = FakeEncoder()
        enc.preprocess = DeleteAfterDecoding(enc.preprocess, root / "img04.jpg")
        out[engine] = Index.build(
            root,
            tmp_path / f"{engine}-ix",
            model=enc,
            batch_size=4,
            workers=0,
            engine=engine,
            engine_options={"num_workers": 1},
            progress=False,
        )
    want = sorted([*bad, "img05.png", "img04.jpg"])
    for engine, ix in out.items():
        skipped = {s.relpath: s for s in ix.skipped()}
        assert sorted(skipped) == want, engine
        assert skipped["img05.png"].reason == skipped["img04.jpg"].reason == "missing", engine
        assert "deleted while the index was being built" in skipped["img04.jpg"].message, engine
        assert len(ix) == len(good) - 2 and ix.report.skipped == len(want), engine

    def rows(ix):  # the records without the absolute path (each engine had its own folder)
        return [(r.id, r.relpath, r.size, r.sha256, r.width, r.height) for r in map(ix.get_image, ix.ids)]

    assert rows(out["ray"]) == rows(out["local"])
    np.testing.assert_array_equal(out["ray"].features("raw"), out["local"].features("raw"))
    for ix in out.values():
        ix.close()


class FailingEncoder(FakeEncoder):
    """Raises in the encoder (inside the Ray actor) on its second image batch."""

    def image_tokens(self, pixels):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2:
            raise ValueError("boom in the encoder")
        return super().image_tokens(pixels)


def test_ray_task_error_is_one_line_not_a_lost_cluster(tmp_path, ray_cluster, _no_outward_network):
    """An exception in our code inside a Ray task is reported as that exception (not as the cluster
    failing), in one line, with the batches committed before it kept."""
    allow_ray_node(_no_outward_network)
    root = tmp_path / "img"
    generated_folder(root, n=8)
    with pytest.raises(RuntimeError) as err:
        Index.build(root, tmp_path / "ix", model=FailingEncoder(), batch_size=4, engine="ray", progress=False)
    msg = str(err.value)
    m = re.fullmatch(
        r"a Ray task failed after (\d+) of 10 files \(ValueError: boom in the encoder\); everything .*", msg
    )
    assert m and "\n" not in msg and "Ray cluster" not in msg, msg
    with Index.open(tmp_path / "ix") as ix:
        assert len(ix) + len(ix.skipped()) == int(m.group(1)) < 10


def test_missing_extras_fail_with_one_line(monkeypatch, tmp_path):
    from calibclip.index.ray_engine import _ray
    from calibclip.index.stores import open_store

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RuntimeError, match=r"pip install 'calibclip\[ray\]'"):
        _ray()
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(RuntimeError, match=r"pip install 'calibclip\[milvus\]'"):
        open_store(f"milvus:{tmp_path / 'x.db'}", writable=True)


def stored(index_dir: Path) -> int:
    """Images committed so far by a running build (0 before its first commit)."""
    try:
        with Index.open(index_dir) as ix:
            return len(ix)
    except Exception:
        return 0


def test_watchdog_reports_a_lost_cluster_once_and_never_during_a_commit():
    import threading
    import time

    from calibclip.index.ray_engine import Watchdog, gcs_ping

    alive = {"up": True}
    calls = []
    lock = threading.Lock()
    dog = Watchdog(lambda: alive["up"], lambda: calls.append(time.perf_counter()), lock, interval=0.02, tries=3)
    dog.start()
    time.sleep(0.15)
    assert calls == []
    with lock:  # a commit in progress
        alive["up"] = False
        time.sleep(0.2)
        assert calls == []
        held_until = time.perf_counter()
    dog.join(2)
    assert len(calls) == 1 and calls[0] >= held_until
    assert gcs_ping("127.0.0.1:9")() is False  # nothing listens on the discard port


@pytest.mark.slow
def test_ray_cluster_gone_mid_run_keeps_committed_work(tmp_path):
    """A real cluster (`ray start --head`) whose GCS is killed mid-run: one clear line, work kept, resume."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    start = subprocess.run(
        [
            ray_bin,
            "start",
            "--head",
            "--num-cpus",
            "2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            "--port",
            "6391",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert start.returncode == 0, start.stderr
    session = Path(os.path.realpath("/tmp/ray/session_latest")).name  # the cluster just started
    root = tmp_path / "img"
    good, _ = generated_folder(root, n=40)
    script = (
        "from fakes import PhotoEncoder as FakeEncoder\nfrom calibclip.index import Index\n"
        f"Index.build({str(root)!r}, {str(tmp_path / 'ix')!r}, model=FakeEncoder(delay=1.0), batch_size=2, "
        "engine='ray', engine_options={'address': '127.0.0.1:6391'}, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and stored(tmp_path / "ix") < 4:
            time.sleep(1)
    finally:
        pids = subprocess.run(["pgrep", "-f", session], capture_output=True, text=True).stdout.split()
        for pid in pids:  # only the processes of the cluster this test started
            os.kill(int(pid), signal.SIGKILL)
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(":6391"):
            current.unlink()  # or the next ray.init() without an address would look for the dead cluster
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    ours = [ln for ln in err.splitlines() if ln.startswith("calibclip index: error:")]
    assert len(ours) == 1 and "failed mid-run" in ours[0] and "run the same command again" in ours[0]
    kept = len(Index.open(tmp_path / "ix"))
    assert 4 <= kept < len(good)
    resumed = Index.build(root, tmp_path / "ix", model=FakeEncoder(), batch_size=4, workers=0, progress=False)
    assert len(resumed) == len(good) and resumed.report.added == len(good) - kept
