"""Scale-out acceptance (issue 13): engines x stores on real Flickr8k photos, kill -9 + resume of a
Ray run, throughput, and search latency local FAISS vs Milvus Lite at matched recall.

    nice python bench/bench_scale.py equality --images 1000   # 4-way equality + images/s + Milvus recall
    nice python bench/bench_scale.py kill --images 1000       # kill -9 a Ray-engine run, resume
    nice python bench/bench_scale.py latency --sizes 100000,1000000 --milvus-max 100000
    nice python bench/bench_scale.py throughput --images 300     # local vs Ray with 1 and 2 actors

Images are symlinked from ../shared/data/flickr8k (first N of the dev list) into a folder under
/tmp (never the repo). Every figure is printed beside its peer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FLICKR = Path(os.environ.get("CALIBCLIP_SHARED", REPO.parent / "shared")) / "data" / "flickr8k"


def photo_folder(n: int, work: Path) -> tuple[Path, list[str]]:
    """``work/imgN``: symlinks to the first ``n`` dev images; returns it and 100+ caption queries."""
    names = (FLICKR / "Flickr8k_text" / "Flickr_8k.devImages.txt").read_text().split()[:n]
    folder = work / f"img{n}"
    if not folder.exists():
        folder.mkdir(parents=True)
        for name in names:
            (folder / name).symlink_to(FLICKR / "Flicker8k_Dataset" / name)
    caps: dict[str, str] = {}
    for line in (FLICKR / "Flickr8k_text" / "Flickr8k.token.txt").read_text().splitlines():
        key, _, text = line.partition("\t")
        img = key.split("#")[0]
        if img in names and img not in caps:
            caps[img] = text.strip()
    return folder, [caps[n] for n in names if n in caps][:100]


def cached_encoder(encoder: object, cache: Path, record: bool) -> object:
    """Make ``encoder.encode_image`` keep (``record``) or replay each image's raw vector, keyed by the
    SHA-256 of its preprocessed float32 pixels, in ``cache`` (one .npy per image; works in Ray actors,
    which unpickle this function). A replay that finds a row missing encodes the batch for real and
    leaves a ``miss-*`` marker, so a difference in decoded pixels between two runs is counted."""
    import hashlib

    import torch

    cache.mkdir(parents=True, exist_ok=True)
    real = type(encoder).encode_image  # type: ignore[attr-defined]

    def encode_image(pixels: torch.Tensor) -> torch.Tensor:
        keys = [hashlib.sha256(p.detach().float().cpu().numpy().tobytes()).hexdigest()[:32] for p in pixels]
        files = [cache / f"{k}.npy" for k in keys]
        if not record and all(f.exists() for f in files):
            return torch.from_numpy(np.stack([np.load(f) for f in files]))
        out = real(encoder, pixels)
        for k, f, row in zip(keys, files, out.float().cpu().numpy(), strict=True):
            if record:
                np.save(f, row)
            elif not f.exists():
                (cache / f"miss-{k}").touch()
        return out

    encoder.encode_image = encode_image  # type: ignore[attr-defined]
    return encoder


def build(
    folder: Path, spec: str, engine: str, workers: int | None = None, cache: tuple[Path, bool] | None = None
) -> tuple[object, float]:
    from calibclip.index import Index
    from calibclip.models.registry import create_model

    t0 = time.perf_counter()
    model = create_model("starter").eval()
    if cache is not None:
        model = cached_encoder(model, *cache)
    ix = Index.build(
        folder,
        spec,
        model=model,
        batch_size=16,
        engine=engine,
        progress=False,
        engine_options={"num_workers": workers or 1, "num_cpus": 2},
    )
    return ix, time.perf_counter() - t0


def equality(args: argparse.Namespace) -> None:
    """The 4-way check. Each engine encodes the photos once, into the local store (its vectors kept per
    image in a cache); its Milvus run goes through the same engine and store path but replays those
    vectors instead of running the model again (``--no-replay``: encode every run for real)."""
    from calibclip.index import Index

    work = Path(args.work)
    n = args.images
    folder, queries = photo_folder(n, work)
    cache = work / f"vec{n}"
    replay = not args.no_replay
    # name -> (spec, engine, workers, (cache folder, record?) or None)
    runs: dict[tuple[str, str], tuple[str, str, int | None, tuple[Path, bool] | None]] = {
        ("local", "local"): (str(work / f"ll{n}"), "local", None, (cache / "local", True) if replay else None),
        ("ray", "local"): (str(work / f"rl{n}"), "ray", 1, (cache / "ray", True) if replay else None),
        ("local", "milvus"): (
            f"milvus:{work / f'lm{n}.db'}",
            "local",
            None,
            (cache / "local", False) if replay else None,
        ),
        ("ray", "milvus"): (f"milvus:{work / f'rm{n}.db'}", "ray", 1, (cache / "ray", False) if replay else None),
    }
    if args.ray2:
        runs["ray x2", "local"] = (str(work / f"rl2-{n}"), "ray", 2, None)
    out: dict[tuple[str, str], object] = {}
    speed: dict[tuple[str, str], float] = {}
    # One local Ray for all Ray runs (a second ray.init in one process can time out on a loaded machine);
    # the engine joins it, so Ray start-up is not in the images/s below (model shipping to the actors is).

    start_local_ray()
    done_file = work / f"speeds{n}.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    for key, (spec, engine, workers, cached) in runs.items():
        name = f"{key[0]}|{key[1]}"
        if name in done and args.reuse:
            out[key], speed[key] = Index.open(spec), done[name]
            print(f"reused {key}: {len(out[key])} images, {speed[key]:.2f} images/s measured earlier", flush=True)
            continue
        if spec.startswith("milvus:"):
            shutil.rmtree(spec[7:], ignore_errors=True)  # Milvus Lite 3 keeps a .db folder
            Path(spec[7:]).unlink(missing_ok=True)
        else:
            shutil.rmtree(spec, ignore_errors=True)
        if cached is not None and cached[1]:
            shutil.rmtree(cached[0], ignore_errors=True)
        ix, secs = build(folder, spec, engine, workers, cached)
        out[key] = ix
        speed[key] = len(ix) / secs  # type: ignore[arg-type]
        done[name] = speed[key]
        done_file.write_text(json.dumps(done))
        how = "model run" if cached is None or cached[1] else "vectors replayed"
        misses = len(list(cached[0].glob("miss-*"))) if cached is not None and not cached[1] else 0
        print(
            f"built {key}: {len(ix)} images in {secs:.1f}s = {speed[key]:.2f} images/s "  # type: ignore[arg-type]
            f"(incl. model load; {how}{f', {misses} replay misses' if not (cached is None or cached[1]) else ''})",
            flush=True,
        )
    ref = out["local", "local"]
    enc = ref.encoder  # type: ignore[attr-defined]
    qv = np.stack([ref.encode_text(q)["raw"].numpy() for q in queries])  # type: ignore[attr-defined]
    _, want = ref.search_vectors(qv, k=10, ann="exact")  # type: ignore[attr-defined]
    print(f"\n{len(queries)} caption queries, model {enc.name}")
    print("| engine, store | images | same ids+paths+records | max |vector diff| vs local | same exact top-10 |")
    print("|---|---|---|---|---|")
    ref_recs = [ref.get_image(i) for i in ref.ids]  # type: ignore[attr-defined]
    for key, ix in out.items():
        same = (
            ix.ids.tolist() == ref.ids.tolist()  # type: ignore[attr-defined]
            and list(ix.paths()) == list(ref.paths())  # type: ignore[attr-defined]
            and [ix.get_image(i) for i in ix.ids] == ref_recs  # type: ignore[attr-defined]
        )
        diff = float(np.abs(ix.features("raw") - ref.features("raw")).max())  # type: ignore[attr-defined]
        _, got = ix.search_vectors(qv, k=10, ann="exact")  # type: ignore[attr-defined]
        print(f"| {key[0]}, {key[1]} | {len(ix)} | {same} | {diff:.3g} | {int((got == want).all(1).sum())}/{len(qv)} |")
    print("\n| engine (store local) | images/s (model run) |")
    print("|---|---|")
    for key in (("local", "local"), ("ray", "local"), ("ray x2", "local")):
        if key in speed:
            print(f"| {key[0]} | {speed[key]:.2f} |")
    mil = out["local", "milvus"]
    print("\nMilvus ANN on the (local, milvus) index (recall@10 vs exact, same queries):")
    for kind, params in [("hnsw", {"ef_search": e}) for e in (10, 16, 32, 64)] + [
        ("ivf", {"nprobe": p}) for p in (1, 2, 4, 8, 16, 32)
    ]:
        _, got = mil.search_vectors(qv, k=10, ann=kind, **params)  # type: ignore[attr-defined]
        rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want, strict=True)])
        print(f"  {kind} {params}: recall@10 {rec:.3f}", flush=True)
    for ix in out.values():
        ix.close()  # type: ignore[attr-defined]
    del Index


def start_local_ray() -> None:
    """One local 2-CPU Ray for every Ray run of this process (no dashboard; workers see this sys.path)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}},
    )


def throughput(args: argparse.Namespace) -> None:
    """images/s of the local engine and of the Ray engine with 1 and 2 encoder actors, into local
    stores, model run every time, one after the other in one process (one shared local 2-CPU Ray)."""

    work = Path(args.work)
    folder, _ = photo_folder(args.images, work)
    start_local_ray()
    speed = {}
    for name, engine, workers in (
        ("local engine", "local", None),
        ("ray, 1 actor", "ray", 1),
        ("ray, 2 actors", "ray", 2),
    ):
        spec = str(work / f"tp-{engine}{workers or ''}-{args.images}")
        shutil.rmtree(spec, ignore_errors=True)
        ix, secs = build(folder, spec, engine, workers)
        speed[name] = len(ix) / secs  # type: ignore[arg-type]
        print(f"{name}: {len(ix)} images in {secs:.1f}s = {speed[name]:.2f} images/s (incl. model load)", flush=True)
        ix.close()  # type: ignore[attr-defined]
    base = speed["local engine"]
    print("\n| engine (store local) | images/s | vs local engine |\n|---|---|---|")
    for name, v in speed.items():
        print(f"| {name} | {v:.2f} | {v / base:.2f}x |")


def stored(spec: str) -> int:
    from calibclip.index import Index

    try:
        with Index.open(spec) as ix:
            return len(ix)
    except Exception:
        return 0


def kill(args: argparse.Namespace) -> None:
    from calibclip.index import Index

    work = Path(args.work)
    folder, _ = photo_folder(args.images, work)
    spec = str(work / f"kill{args.images}")
    shutil.rmtree(spec, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "calibclip.cli.main",
        "index",
        str(folder),
        "--out",
        spec,
        "--engine",
        "ray",
        "--batch-size",
        "8",
        "--quiet",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while stored(spec) < args.kill_after and proc.poll() is None and time.time() - t0 < 1200:
        time.sleep(0.5)
    before = stored(spec)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(5)
    print(f"kill -9 of the Ray-engine run after {time.time() - t0:.0f}s with {before} images committed")
    lingering = subprocess.run(["pgrep", "-f", "ray::"], capture_output=True, text=True).stdout.split()
    print(f"Ray worker processes left 5 s after the kill (any session on this machine): {len(lingering)}")
    t1 = time.perf_counter()
    resumed = Index.build(
        folder,
        spec,
        model="starter",
        batch_size=8,
        engine="ray",
        progress=False,
        engine_options={"num_workers": 1, "num_cpus": 2},
    )
    rep = resumed.report
    paths = [resumed.get_image(i).relpath for i in resumed.ids]
    print(
        f"resume: added {rep.added} (expected {args.images - before - rep.skipped}), unchanged {rep.unchanged}, "
        f"count {len(resumed)}, unique paths {len(set(paths))}, skipped {rep.skipped}, "
        f"{time.perf_counter() - t1:.0f}s"
    )
    ref_spec = work / f"ll{args.images}"
    if ref_spec.exists():
        with Index.open(ref_spec) as ref:
            order = [ref.find(p) for p in paths]
            diff = float(np.abs(resumed.features("raw") - ref.features("raw", order)).max())
            print(
                f"vectors vs the uninterrupted local-engine index: max |diff| {diff:.3g}; same path set: "
                f"{sorted(paths) == sorted(r.relpath for r in map(ref.get_image, ref.ids))}"
            )
    resumed.close()


def latency(args: argparse.Namespace) -> None:
    from calibclip.index import Index, Storage, open_store

    work = Path(args.work)
    dim = 512
    for n in [int(s) for s in args.sizes.split(",")]:
        rng = np.random.default_rng(0)
        centres = rng.standard_normal((256, dim)).astype(np.float32)
        labels = rng.integers(0, 256, n)
        queries = centres[rng.integers(0, 256, 200)] + 0.7 * rng.standard_normal((200, dim)).astype(np.float32)
        print(f"\n== {n:,} vectors, dim {dim}, 200 single-vector queries, k=10 ==", flush=True)
        targets = {"local": str(work / f"lat{n}")}
        if n <= args.milvus_max:
            targets["milvus"] = f"milvus:{work / f'lat{n}.db'}"
        for backend, spec in targets.items():
            t0 = time.perf_counter()
            if args.reuse and stored(spec) == n:
                print(f"[{backend}] reusing the {n:,} vectors stored by an earlier run (same seed)", flush=True)
            else:
                if backend == "local":
                    shutil.rmtree(spec, ignore_errors=True)
                    st = Storage(spec, writable=True)
                else:
                    Path(spec[7:]).unlink(missing_ok=True)
                    shutil.rmtree(spec[7:], ignore_errors=True)
                    st = open_store(spec, writable=True)  # type: ignore[assignment]
                st.initialise(dim, ["raw"], {"model": "synthetic", "fingerprint": "synthetic", "root": str(work)})
                for s in range(0, n, 5000):
                    m = min(n, s + 5000) - s
                    vec = centres[labels[s : s + m]] + 0.7 * rng.standard_normal((m, dim)).astype(np.float32)
                    recs = [{"path": f"{i}.jpg", "size": 1, "mtime_ns": 1, "sha256": "-"} for i in range(s, s + m)]
                    st.commit_batch({"raw": vec}, recs)
                st.close()
                print(f"[{backend}] stored in {time.perf_counter() - t0:.0f}s", flush=True)
            ix = Index.open(spec)
            _, exact = ix.search_vectors(queries, k=10, ann="exact")
            grid = [("hnsw", {"ef_search": e}) for e in (16, 32, 64, 128)] + [
                ("ivf", {"nprobe": p}) for p in (8, 16, 64)
            ]
            if args.only:
                grid = [g for g in grid if backend in args.only.split(",")]
                if not grid:
                    ix.close()
                    continue
            if backend == "local" and n > 200_000:
                grid = [g for g in grid if g[0] == "ivf"]  # HNSW build of 1e6 does not fit this machine's time
            for kind, params in [("exact", {})] + grid:
                t0 = time.perf_counter()
                ix.search_vectors(queries[:2], k=10, ann=kind, **params)  # builds / loads the structure
                built = time.perf_counter() - t0
                lat, hits = [], []
                for q in queries:
                    t1 = time.perf_counter()
                    _, ids = ix.search_vectors(q[None], k=10, ann=kind, **params)
                    lat.append((time.perf_counter() - t1) * 1000)
                    hits.append(ids[0])
                rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hits, exact, strict=True)])
                print(
                    f"[{backend}] {kind:5} {str(params):18} recall@10 {rec:.3f}  p50 {np.percentile(lat, 50):7.2f} ms"
                    f"  p95 {np.percentile(lat, 95):7.2f} ms  (first call incl. build {built:.1f}s)",
                    flush=True,
                )
            ix.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("equality", "kill", "latency", "throughput"))
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--kill-after", type=int, default=64, help="images committed before the kill -9")
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--milvus-max", type=int, default=100000, help="largest size also stored in Milvus Lite")
    p.add_argument("--work", default="/tmp/calibclip-bench-scale")
    p.add_argument("--reuse", action="store_true", help="reuse indexes/stores built by an earlier run")
    p.add_argument("--only", default="", help="latency: only these backends (local,milvus)")
    p.add_argument("--ray2", action="store_true", help="equality: also a Ray run with 2 encoder actors")
    p.add_argument("--no-replay", action="store_true", help="equality: run the model in every build")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    {"equality": equality, "kill": kill, "latency": latency, "throughput": throughput}[args.part](args)


if __name__ == "__main__":
    main()
