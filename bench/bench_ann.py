"""`calibclip.index.ann.AnnIndex` and `ExactSearcher` directly on N synthetic embedding-like vectors (default 1e6 x 512;
512 is also the starter's dimension), without writing an index folder: build time (k-means training sample and
add), memory, single-query latency p50/p95 and recall@10 against exact search per ``nprobe`` (IVF) or
``efSearch`` (HNSW), and exact search of a batch of queries by calibclip's `ExactSearcher` next to FAISS's
``IndexFlatIP`` in the same run.

``--cache DIR`` keeps the generated vectors, the exact ground truth and every built ANN structure in DIR (outside
the repository), so a rerun only measures: regenerating 1e6 vectors and building IVF take minutes on a busy CPU.
A cached structure reports the build time measured when it was built (marked "cached").

    python bench/bench_ann.py [--n 1000000] [--dim 512] [--queries 200] [--kinds ivf] [--nlist 4000]
        [--nprobe 8 16 24 32 64] [--threads 1 2] [--cache /work/cache/ann] [--skip-exact]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_index import synthetic  # noqa: E402

from calibclip.index import ann  # noqa: E402
from calibclip.index.search import ExactSearcher  # noqa: E402


def load_or_make(cache: Path | None, name: str, make):  # noqa: ANN001 - a small bench helper
    """``make()`` cached as ``cache/name`` (.npy)."""
    if cache is not None and (cache / name).exists():
        return np.load(cache / name)
    value = make()
    if cache is not None:
        tmp = cache / f".{name}.{os.getpid()}.tmp.npy"
        np.save(tmp, value)
        os.replace(tmp, cache / name)
    return value


def build_cached(cache: Path | None, tag: str, kind: str, gallery: np.ndarray, **params):  # noqa: ANN001
    """``(AnnIndex, build seconds, cached?)``."""
    import faiss

    path = cache / f"{tag}-{kind}-{'-'.join(f'{k}{v}' for k, v in sorted(params.items()))}.faiss" if cache else None
    if path is not None and path.exists() and path.with_suffix(".json").exists():
        side = json.loads(path.with_suffix(".json").read_text())
        return ann.AnnIndex(kind, faiss.read_index(str(path)), side["params"]), side["build_s"], True
    t0 = time.perf_counter()
    index = ann.AnnIndex.build(kind, gallery, **params)
    build_s = time.perf_counter() - t0
    if path is not None:
        faiss.write_index(index.index, str(path))
        path.with_suffix(".json").write_text(json.dumps({"params": index.params, "build_s": build_s}))
    return index, build_s, False


def latency(
    index: ann.AnnIndex, queries: np.ndarray, truth: np.ndarray, k: int, **search
) -> tuple[float, float, float]:
    index.search(queries[:1], k, **search)  # warm
    lat, hits = [], 0.0
    for i in range(len(truth)):
        t0 = time.perf_counter()
        _, pos = index.search(queries[i : i + 1], k, **search)
        lat.append(time.perf_counter() - t0)
        hits += len(set(pos[0].tolist()) & set(truth[i].tolist())) / k
    return float(np.percentile(lat, 50) * 1e3), float(np.percentile(lat, 95) * 1e3), hits / len(truth)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=1e6)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch-queries", type=int, default=1000, help="queries of the batched exact-search timing")
    ap.add_argument("--kinds", nargs="+", default=["ivf"], choices=("ivf", "hnsw"))
    ap.add_argument("--nlist", type=int, nargs="+", default=None, help="IVF cells (default: ann.ivf_nlist(N))")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 24, 32, 64])
    ap.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="FAISS/torch threads for single queries")
    ap.add_argument("--exact-threads", type=int, default=2, help="threads of the batched exact comparison")
    ap.add_argument("--cache", type=Path, default=None, help="folder for vectors, ground truth and built indexes")
    ap.add_argument("--exact-rounds", type=int, default=2)
    ap.add_argument("--baseline-src", help="also time the ExactSearcher of this source tree (e.g. main's src)")
    ap.add_argument("--skip-exact", action="store_true", help="skip the batched exact calibclip-vs-FAISS timing")
    args = ap.parse_args()
    import faiss

    n, d, k, nq = int(args.n), args.dim, args.k, max(args.batch_queries, args.queries)
    tag = f"synthetic-n{n}-d{d}-q{nq}-seed1"
    if args.cache is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
    print(f"cpu count {os.cpu_count()}, load average {os.getloadavg()}", flush=True)

    def make() -> np.ndarray:
        x = synthetic(n + nq, d, seed=1)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    t0 = time.perf_counter()
    x = load_or_make(args.cache, f"{tag}.npy", make)
    queries = x[n:].copy()
    g16 = x[:n].astype(np.float16)  # what an index stores; ANN and ground truth both use its normalised rows
    del x
    norms = np.linalg.norm(g16.astype(np.float32), axis=1)
    exact = ExactSearcher(g16, norms, np.arange(n))
    gallery = exact.matrix().numpy()  # type: ignore[union-attr]
    print(f"{n} x {d} synthetic vectors in {time.perf_counter() - t0:.1f} s", flush=True)

    torch.set_num_threads(args.exact_threads)
    faiss.omp_set_num_threads(args.exact_threads)
    truth_file = f"{tag}-truth-k{k}.npy"
    if args.skip_exact:

        def flat_truth() -> np.ndarray:
            flat = faiss.IndexFlatIP(d)
            flat.add(np.ascontiguousarray(gallery))
            return flat.search(queries[: args.queries], k)[1]

        truth = load_or_make(args.cache, truth_file, flat_truth)
    else:
        # exact search, batched: calibclip ExactSearcher (float16 storage, normalised in memory) vs FAISS flat
        flat = faiss.IndexFlatIP(d)
        flat.add(np.ascontiguousarray(gallery))
        qb = queries[: args.batch_queries]
        base = None
        if args.baseline_src:  # the ExactSearcher of another checkout, same vectors, same rounds
            import importlib.util

            spec = importlib.util.spec_from_file_location(
                "baseline_search", Path(args.baseline_src) / "calibclip" / "index" / "search.py"
            )
            mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(mod)  # type: ignore[union-attr]
            base = mod.ExactSearcher(g16, norms, np.arange(n))
            base.matrix()
        rounds, t_base = [], []
        for _ in range(args.exact_rounds):  # interleaved, best of the rounds
            t0 = time.perf_counter()
            _, ours = exact.search(qb, k)
            t_ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            _, theirs = flat.search(qb, k)
            t_flat = time.perf_counter() - t0
            rounds.append((t_ours, t_flat))
            if base is not None:
                t0 = time.perf_counter()
                _, old = base.search(qb, k)
                t_base.append(time.perf_counter() - t0)
                assert np.array_equal(old, ours), "baseline and this tree disagree"
        if base is not None:
            print(
                f"baseline ExactSearcher ({args.baseline_src}): best {min(t_base):.2f} s, rounds "
                f"{[round(t, 2) for t in t_base]} (identical top-{k})",
                flush=True,
            )
            del base
        t_ours, t_flat = min(r[0] for r in rounds), min(r[1] for r in rounds)
        agree = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, theirs)]))
        print(
            f"exact batched {len(qb)} queries x {n}, {args.exact_threads} threads, best of {args.exact_rounds}: "
            f"calibclip ExactSearcher "
            f"{t_ours:.2f} s, FAISS IndexFlatIP {t_flat:.2f} s (calibclip speed / FAISS speed {t_flat / t_ours:.2f}; "
            f"top-{k} agreement {agree:.4f}; rounds {[(round(a, 2), round(b, 2)) for a, b in rounds]})",
            flush=True,
        )
        truth = load_or_make(args.cache, truth_file, lambda: flat.search(queries[: args.queries], k)[1])
        del flat
    truth = truth[: args.queries]
    del exact, g16

    print(f"\n| index | build s | MiB (B/vector) | threads | setting | p50 ms | p95 ms | recall@{k} |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        configs = [{"nlist": nl} for nl in (args.nlist or [None])] if kind == "ivf" else [{}]
        for params in configs:
            params = {key: v for key, v in params.items() if v is not None}
            index, build_s, cached = build_cached(args.cache, tag, kind, gallery, **params)
            mem = index.memory_bytes()
            desc = f"IVF-Flat nlist {index.params['nlist']}" if kind == "ivf" else f"HNSW-Flat M {index.params['M']}"
            built = f"{build_s:.1f}" + (" (cached)" if cached else "")
            settings = (
                [("nprobe", v, {"nprobe": v}) for v in args.nprobe]
                if kind == "ivf"
                else [("efSearch", v, {"ef_search": v}) for v in args.ef_search]
            )
            for threads in args.threads:
                torch.set_num_threads(threads)
                faiss.omp_set_num_threads(threads)
                for name, value, search in settings:
                    p50, p95, recall = latency(index, queries, truth, k, **search)
                    print(
                        f"| {desc} | {built} | {mem / 2**20:.0f} ({mem / n:.0f}) | {threads} | {name} {value} | "
                        f"{p50:.2f} | {p95:.2f} | {recall:.3f} |",
                        flush=True,
                    )
            del index
    print(f"\nload average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
