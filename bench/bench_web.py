"""Benchmark `POST /api/search` of `calibclip serve`: p50/p95/p99 latency and throughput with N
concurrent clients (default 20) against a real server process (uvicorn), default model, CPU.

``--compare`` measures, in the same run and against the same index, the server without
micro-batching (``--batch-size 1``: every query encoded alone, serialised — the old behaviour)
and with it (the defaults), one after the other, and prints both.

The server is started as ``calibclip serve INDEX`` in a subprocess; clients are threads with
their own keep-alive HTTP connection, each sending queries back to back for ``--duration``
seconds after a warm-up. Queries alternate text searches (Flickr8k-style captions, varied so
nothing is cached) and composed searches (a random indexed reference + a modification text).

Gallery: ``--index DIR`` serves an existing index (e.g. ``calibclip index PHOTOS --out DIR`` on
10,000 photos). Without it, a ``--size``-image index (default 10,000) is made from real photos:
the photos (``--photos DIR``, default scikit-image's bundled photos) are encoded with the default
model through `Index.build`, then replicated to ``--size`` rows, each copy's embedding perturbed
by small Gaussian noise (``--noise``, relative to the embedding norm) so that rows are distinct,
and written through the index's `Storage` API with files linked to the photos. Search cost does
not depend on what the vectors encode, only on their number and dimension, so this measures the
same work as 10,000 distinct photos without encoding 10,000 images on a small CPU.

    python bench/bench_web.py                       # 10,000-row index from real photos, 20 clients
    python bench/bench_web.py --index runs/idx --clients 20 --duration 60 --json runs/bench_web.json
    python bench/bench_web.py --index /tmp/f8k.idx --mix text --compare --duration 60
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SKIMAGE_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "horse.png",
    "camera.png",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "retina.jpg",
)
QUERIES = (
    "a dog running on the grass",
    "two children playing in the water",
    "a man riding a bicycle down a street",
    "a black and white photo of a man with a camera",
    "a cat looking at the camera",
    "a cup of coffee on a table",
    "a rocket on the launch pad at night",
    "a woman in an orange space suit",
    "a red motorcycle in a garage",
    "stars and galaxies in the night sky",
    "a horse standing in a field",
    "a person climbing a rock wall",
    "a group of people standing in front of a building",
    "a boy jumping into a swimming pool",
    "a brown dog carrying a stick",
    "people walking on a snowy mountain",
)
MODIFICATIONS = (
    "make it black and white",
    "at night",
    "with more people",
    "in a garden",
    "a close-up of it",
    "the same but red",
    "without the background",
    "two of them",
)


def skimage_photos() -> list[Path]:
    import skimage.data

    root = Path(os.path.dirname(skimage.data.__file__))
    return [root / n for n in SKIMAGE_PHOTOS if (root / n).exists()]


def make_replicated_index(photos: list[Path], out: Path, size: int, noise: float, seed: int, model: str) -> Path:
    """Encode ``photos`` with ``model`` (`Index.build`), then write a ``size``-row index of perturbed
    copies of their embeddings whose files are links to the photos. Returns the index folder."""
    from calibclip.data.images import load_image
    from calibclip.index import Index, Storage
    from calibclip.index.build import model_identity

    photo_dir = out / "photos"
    photo_dir.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(photos):
        dst = photo_dir / f"{i:05d}_{p.name}"
        if not dst.exists():
            shutil.copyfile(p, dst)
    t0 = time.perf_counter()
    seed_index = Index.build(photo_dir, out / "seed-index", model=model, workers=0, progress=True)
    ids, paths = zip(*seed_index.paths())
    feats = seed_index.features("raw", list(ids))
    print(f"encoded {len(ids)} real photos in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    gallery = out / "gallery"
    gallery.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    src = np.arange(size) % len(ids)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    vectors = feats[src] + noise * norms[src] * rng.standard_normal((size, feats.shape[1])) / np.sqrt(feats.shape[1])
    dims = [load_image(p).size for p in paths]
    records = []
    for i, j in enumerate(src):
        name = f"{i:05d}_{Path(paths[j]).name.split('_', 1)[1]}"
        link = gallery / name
        if not link.exists():
            os.symlink(Path(paths[j]).resolve(), link)
        w, h = dims[j]
        records.append(
            {
                "path": name,
                "size": Path(paths[j]).stat().st_size,
                "mtime_ns": i,
                "sha256": f"copy-{i}",
                "width": w,
                "height": h,
            }
        )
    index_dir = out / "index"
    storage = Storage(index_dir, writable=True)
    try:
        identity = model_identity(seed_index.encoder, model)
        storage.initialise(int(feats.shape[1]), ["raw"], {**identity, "root": str(gallery.resolve())})
        for s in range(0, size, 2000):
            storage.commit_batch({"raw": vectors[s : s + 2000].astype(np.float32)}, records[s : s + 2000])
    finally:
        storage.close()
    seed_index.close()
    return index_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(index_dir: Path, port: int, threads: int | None, extra: list[str] | None = None) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "calibclip.cli.main",
        "serve",
        str(index_dir),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *(extra or []),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f} s")


def run_clients(
    base: str, clients: int, duration: float, k: int, ids: list[str], seed: int, mix: str = "mixed"
) -> dict:
    """``clients`` threads sending searches back to back for ``duration`` seconds."""
    import httpx

    latencies: list[list[float]] = [[] for _ in range(clients)]
    kinds: list[list[str]] = [[] for _ in range(clients)]
    errors: list[str] = []
    count = [httpx.get(base + "/api/indexes").json()["indexes"][0]["count"]]
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(c: int) -> None:
        rng = np.random.default_rng(seed + c)
        with httpx.Client(base_url=base, timeout=300) as http:
            start.wait()
            n = 0
            while time.perf_counter() < stop_at[0]:
                body = {"text": QUERIES[rng.integers(len(QUERIES))] + f" #{c}-{n}", "k": k}
                if mix == "mixed" and n % 2 == 1:
                    body = {
                        "reference": ids[rng.integers(len(ids))],
                        "text": MODIFICATIONS[rng.integers(len(MODIFICATIONS))],
                        "k": k,
                    }
                t = time.perf_counter()
                r = http.post("/api/search", json=body)
                dt = time.perf_counter() - t
                if r.status_code != 200 or len(r.json()["results"]) != min(k, count[0]):
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                else:
                    latencies[c].append(dt * 1000)
                    kinds[c].append("composed" if "reference" in body else "text")
                n += 1

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.concatenate([np.asarray(x) for x in latencies]) if any(latencies) else np.zeros(0)
    kind = np.concatenate([np.asarray(x) for x in kinds]) if any(kinds) else np.zeros(0)
    out = {
        "clients": clients,
        "requests": int(len(lat)),
        "errors": len(errors),
        "wall_s": round(wall, 2),
        "throughput_rps": round(len(lat) / wall, 3),
    }
    for name, sel in (("all", np.ones(len(lat), bool)), ("text", kind == "text"), ("composed", kind == "composed")):
        if sel.any():
            out[name] = {
                "n": int(sel.sum()),
                "p50_ms": round(float(np.percentile(lat[sel], 50)), 1),
                "p95_ms": round(float(np.percentile(lat[sel], 95)), 1),
                "p99_ms": round(float(np.percentile(lat[sel], 99)), 1),
                "mean_ms": round(float(lat[sel].mean()), 1),
            }
    if errors:
        out["first_errors"] = errors[:3]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, help="existing index to serve (default: make a replicated one)")
    ap.add_argument("--size", type=int, default=10_000, help="rows of the made index (default 10000)")
    ap.add_argument("--photos", type=Path, help="folder of real photos to replicate (default: scikit-image's)")
    ap.add_argument("--max-photos", type=int, default=200, help="at most this many photos from --photos")
    ap.add_argument("--noise", type=float, default=0.05, help="relative noise added to each copy's embedding")
    ap.add_argument("--model", default="starter")
    ap.add_argument("--work", type=Path, help="folder for the made index (default: a temporary one)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of measurement")
    ap.add_argument("--warmup", type=int, default=3, help="sequential warm-up requests")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--mix",
        choices=["text", "mixed"],
        default="mixed",
        help="text: text searches only; mixed: alternate text and composed searches (default)",
    )
    ap.add_argument(
        "--compare",
        action="store_true",
        help="measure without micro-batching (--batch-size 1) and with it (defaults) in one run",
    )
    ap.add_argument("--serve-args", default="", help="extra `calibclip serve` arguments (one string)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()

    tmp = None
    index_dir = args.index
    made = None
    if index_dir is None:
        work = args.work or Path(tmp := tempfile.mkdtemp(prefix="bench-web-"))
        if args.photos:
            from calibclip.data.images import is_image_path

            photos = sorted(p for p in args.photos.rglob("*") if is_image_path(p))[: args.max_photos]
        else:
            photos = skimage_photos()
        if not photos:
            raise SystemExit("no photos found: pass --photos DIR or --index DIR")
        index_dir = work / "index"
        if not index_dir.exists():
            index_dir = make_replicated_index(photos, work, args.size, args.noise, args.seed, args.model)
        made = {"photos": len(photos), "size": args.size, "noise": args.noise}
    configs = [("unbatched", ["--batch-size", "1"]), ("batched", [])] if args.compare else [("server", [])]
    result: dict = {}
    try:
        for label, extra in configs:
            result[label] = measure(index_dir, args, extra + args.serve_args.split())
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    info = result[configs[0][0]].pop("info")
    for label, _ in configs[1:]:
        result[label].pop("info")
    if not args.compare:
        result = result["server"]
    result = {
        **result,
        "index_count": info["count"],
        "model": info["model"],
        "made_from": made,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "k": args.k,
        "mix": args.mix,
        "clients": args.clients,
        "duration_s": args.duration,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    errors = [r["errors"] for r in result.values() if isinstance(r, dict) and "errors" in r] or [result.get("errors")]
    return 0 if not any(errors) else 1


def measure(index_dir: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """Start a server with ``extra`` arguments, warm it up, run the clients, stop it."""
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(index_dir, port, args.threads, extra)
    try:
        wait_ready(base, proc)
        info = httpx.get(base + "/api/indexes").json()["indexes"][0]
        ids = [x["id"] for x in httpx.get(base + "/api/sample", params={"n": 100, "seed": args.seed}).json()["items"]]
        for i in range(args.warmup):
            httpx.post(base + "/api/search", json={"text": QUERIES[i % len(QUERIES)], "k": args.k}, timeout=300)
        out = run_clients(base, args.clients, args.duration, args.k, ids, args.seed, args.mix)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    out["serve_args"] = extra
    out["info"] = info
    return out


if __name__ == "__main__":
    sys.exit(main())
