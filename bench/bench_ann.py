"""`calibclip.index.ann.AnnIndex` and `ExactSearcher` directly on N synthetic embedding-like vectors (default 1e6 x 512;
512 is also the starter's dimension), without writing an index folder: IVF build time (k-means training sample
and add), memory, single-query latency p50/p95 and recall@10 against exact search per ``nprobe``, and exact
search of a batch of queries by calibclip's `ExactSearcher` next to FAISS's ``IndexFlatIP`` in the same run.

    python bench/bench_ann.py [--n 1000000] [--dim 512] [--queries 200] [--nprobe 8 16 24 32 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_index import synthetic  # noqa: E402

from calibclip.index import ann  # noqa: E402
from calibclip.index.search import ExactSearcher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=1e6)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch-queries", type=int, default=1000, help="queries of the batched exact-search timing")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 24, 32, 64])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    n, d, k = int(args.n), args.dim, args.k
    t0 = time.perf_counter()
    x = synthetic(n + args.batch_queries, d, seed=1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    gallery, queries = x[:n], x[n:]
    print(f"{n} x {d} synthetic vectors in {time.perf_counter() - t0:.1f} s; threads {args.threads}", flush=True)

    # exact search, batched: calibclip ExactSearcher (float16 storage, normalised in memory) vs FAISS flat
    exact = ExactSearcher(
        gallery.astype(np.float16), np.linalg.norm(gallery.astype(np.float16).astype(np.float32), axis=1), np.arange(n)
    )
    exact.matrix()
    flat = faiss.IndexFlatIP(d)
    flat.add(np.ascontiguousarray(exact.matrix().numpy()))
    qb = queries[: args.batch_queries]
    t0 = time.perf_counter()
    _, ours = exact.search(qb, k)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, theirs = flat.search(qb, k)
    t_flat = time.perf_counter() - t0
    agree = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, theirs)]))
    print(
        f"exact batched {len(qb)} queries: calibclip ExactSearcher {t_ours:.2f} s, FAISS IndexFlatIP {t_flat:.2f} s "
        f"(ratio faiss/calibclip {t_flat / t_ours:.2f}; top-{k} agreement {agree:.4f})",
        flush=True,
    )
    truth = theirs[: args.queries]
    del flat, exact  # free 4 GB before the IVF build

    t0 = time.perf_counter()
    index = ann.AnnIndex.build("ivf", gallery)
    t_build = time.perf_counter() - t0
    mem = index.memory_bytes()
    print(
        f"IVF build: {t_build:.1f} s, params {index.params}, memory {mem / 2**20:.0f} MiB ({mem / n:.0f} B/vector)",
        flush=True,
    )
    print(f"\n| index | nprobe | p50 ms | p95 ms | recall@{k} |")
    print("|---|---|---|---|---|")
    for nprobe in args.nprobe:
        lat, hits = [], 0.0
        index.search(queries[:1], k, nprobe=nprobe)
        for i in range(args.queries):
            t0 = time.perf_counter()
            _, pos = index.search(queries[i : i + 1], k, nprobe=nprobe)
            lat.append(time.perf_counter() - t0)
            hits += len(set(pos[0]) & set(truth[i])) / k
        p50, p95 = np.percentile(lat, 50) * 1e3, np.percentile(lat, 95) * 1e3
        recall = hits / args.queries
        print(
            f"| IVF-Flat nlist {index.params['nlist']} | {nprobe} | {p50:.2f} | {p95:.2f} | {recall:.3f} |", flush=True
        )


if __name__ == "__main__":
    main()
