"""Benchmark exact vs approximate (FAISS IVF / HNSW) index search.

Synthetic: N embeddings (a mixture of Gaussians, D=512 by default) are written into a real index
folder through `calibclip.index.Storage` (float16 memory map + SQLite), then searched through
`Index.search_vectors` one query at a time (what `calibclip search` and the web app do).
Reports query latency p50/p95, recall@10 against exact search, build time and memory per vector.

Real embeddings: ``--real-gallery G.npy --real-queries Q.npy`` (float arrays ``[N, D]``, e.g. image and
caption features of Flickr8k from the default model; see ``--flickr8k`` to extract them through
the project's FeatureCache) run the same measurements on them.

    python bench/bench_index.py --sizes 10000 100000 --queries 200
    python bench/bench_index.py --sizes 0 --flickr8k ../shared/data/flickr8k --model starter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from calibclip.index import Index, Storage

SETTINGS = (
    [("exact", {})]
    + [("ivf", {"nprobe": n}) for n in (1, 4, 16, 32, 64)]
    + [("hnsw", {"ef_search": e}) for e in (16, 64, 128, 256)]
)


def synthetic(n: int, d: int, seed: int, topics: int = 100, rank: int = 64) -> np.ndarray:
    """Embedding-like vectors: a topic centre (100 topics) + a continuous low-rank part (rank 64)
    + isotropic noise, each of similar energy, so neighbourhoods are neither separated clusters nor
    uniform noise (the generator is fixed; ``seed`` picks the samples)."""
    gen = np.random.default_rng(12345)
    centres = 0.8 * gen.standard_normal((topics, d)).astype(np.float32)
    basis = (gen.standard_normal((rank, d)) / np.sqrt(rank)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        m = min(n, s + 100_000) - s
        z = rng.standard_normal((m, rank)).astype(np.float32)
        out[s : s + m] = centres[rng.integers(0, topics, m)] + z @ basis
        out[s : s + m] += 0.5 * rng.standard_normal((m, d)).astype(np.float32)
    return out


def write_index(directory: Path, vectors: np.ndarray) -> None:
    st = Storage(directory, writable=True)
    st.initialise(
        vectors.shape[1],
        ["raw"],
        {
            "model": "synthetic",
            "model_spec": None,
            "fingerprint": "synthetic",
            "precision": "fp32",
            "root": str(directory),
        },
    )
    for s in range(0, len(vectors), 50_000):
        chunk = vectors[s : s + 50_000]
        recs = [{"path": f"{s + i:08d}.jpg", "size": 0, "mtime_ns": 0, "sha256": ""} for i in range(len(chunk))]
        st.commit_batch({"raw": chunk}, recs)
    st.close()


def measure(index: Index, queries: np.ndarray, k: int, kinds: tuple[str, ...] = ("exact", "ivf", "hnsw")) -> list[dict]:
    rows = []
    _, exact_ids = index.search_vectors(queries, k=k, ann="exact")
    build: dict[str, tuple[float, int]] = {}
    for kind, params in SETTINGS:
        if kind not in kinds:
            continue
        if kind not in build:  # build time of the structure (exact: the in-memory float32 matrix)
            t0 = time.perf_counter()
            extra = (
                index.store.ann_index(kind).memory_bytes()
                if kind != "exact"  # type: ignore[attr-defined]
                else index.store.searcher().matrix() is not None
            )  # type: ignore[attr-defined]
            build[kind] = (time.perf_counter() - t0, int(extra))
        build_s, extra_bytes = build[kind]
        index.search_vectors(queries[:3], k=k, ann=kind, **params)  # warm-up
        lat = []
        hits = []
        for qi, q in enumerate(queries):
            t = time.perf_counter()
            _, ids = index.search_vectors(q[None], k=k, ann=kind, **params)
            lat.append((time.perf_counter() - t) * 1000)
            hits.append(len(set(ids[0].tolist()) & set(exact_ids[qi].tolist())) / k)
        n, d = len(index), index.dim
        stored = d * 2 + 4  # float16 vector + float32 norm on disk
        mem = {"exact": d * 4}.get(kind, extra_bytes / n)  # in-memory float32 matrix, or the FAISS structure
        rows.append(
            {
                "n": n,
                "setting": kind + "".join(f" {k_}={v}" for k_, v in params.items()),
                "p50_ms": np.percentile(lat, 50),
                "p95_ms": np.percentile(lat, 95),
                "recall@10": float(np.mean(hits)),
                "build_s": build_s,
                "disk_bytes_per_vector": stored,
                "ram_bytes_per_vector": mem,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def flickr8k_embeddings(
    root: str,
    model: str,
    batch_size: int,
    workers: int,
    splits: tuple[str, ...] = ("dev", "train"),
    captions: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image features of the Flickr8k ``splits`` (gallery) and the dev captions' features (queries),
    through the project's FeatureCache with the evaluator's cache tags (so either reuses the other)."""
    from calibclip.data.cache import FeatureCache
    from calibclip.data.captions import load_flickr8k
    from calibclip.models.registry import create_model

    encoder = create_model(model)
    cache = FeatureCache()
    dev = load_flickr8k(root, "dev")

    def tags(ds):  # noqa: ANN001, ANN202 - as calibclip.evaluation.evaluator.dataset_features
        return {"dataset": ds.name, "split": ds.split, "preprocess": encoder.preprocess.describe()}

    queries = cache.text_features(encoder, dev.captions[:captions], batch_size=128, **tags(dev))["raw"]
    gallery = np.concatenate(
        [
            cache.image_features(encoder, ds.images, batch_size=batch_size, workers=workers, **tags(ds))["raw"]
            for ds in (load_flickr8k(root, split) for split in splits)
        ]
    )
    return gallery, queries


@torch.inference_mode()
def minilm_caption_embeddings(root: str, n_gallery: int, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """all-MiniLM-L6-v2 sentence embeddings (the starter model's frozen text tower, 384-d, mean-pooled)
    of the first ``n_gallery`` Flickr8k train captions (gallery) and ``n_queries`` dev captions (queries).
    Real embeddings that need no trained head (caption-to-caption neighbours)."""
    from calibclip.data.captions import load_flickr8k
    from calibclip.models.starter import MiniLM, minilm_pool, minilm_tokenize

    model = MiniLM()

    def embed(texts: list[str]) -> np.ndarray:
        out = []
        order = np.argsort([len(t) for t in texts], kind="stable")
        for s in range(0, len(texts), 256):
            batch = minilm_tokenize([texts[i] for i in order[s : s + 256]])
            hidden, _ = model(batch.input_ids, batch.attention_mask)
            out.append(minilm_pool(hidden, batch.attention_mask).numpy())
        feats = np.concatenate(out)
        result = np.empty_like(feats)
        result[order] = feats
        return result

    train, dev = load_flickr8k(root, "train"), load_flickr8k(root, "dev")
    return embed(train.captions[:n_gallery]), embed(dev.captions[:n_queries])


def table(rows: list[dict]) -> str:
    out = [
        "| N | setting | p50 ms | p95 ms | recall@10 | build s | RAM B/vec | disk B/vec |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['n']:,} | {r['setting']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['recall@10']:.3f} | "
            f"{r['build_s']:.1f} | {r['ram_bytes_per_vector']:.0f} | {r['disk_bytes_per_vector']} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6], help="synthetic gallery sizes (0: none)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", nargs="+", default=["exact", "ivf", "hnsw"], help="settings to measure")
    ap.add_argument("--threads", type=int, default=None, help="torch/FAISS threads (default: all)")
    ap.add_argument("--real-gallery", help=".npy gallery embeddings [N, D]")
    ap.add_argument("--real-queries", help=".npy query embeddings [Q, D] (default: hold out --queries gallery rows)")
    ap.add_argument("--flickr8k", help="Flickr8k root: extract real embeddings with --model (FeatureCache)")
    ap.add_argument("--flickr8k-splits", nargs="+", default=["dev", "train"], help="gallery splits")
    ap.add_argument("--flickr8k-captions", type=int, default=None, help="use the first N dev captions as queries")
    ap.add_argument(
        "--minilm-captions",
        type=int,
        nargs=2,
        metavar=("GALLERY", "QUERIES"),
        help="with --flickr8k: MiniLM caption embeddings instead of the model's image features",
    )
    ap.add_argument("--model", default="starter")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", help="write all rows to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        import faiss

        faiss.omp_set_num_threads(args.threads)
    os.environ.setdefault("CALIBCLIP_NO_PROGRESS", "1")
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes if s > 0):
            d = Path(tmp) / f"synthetic-{size}"
            write_index(d, synthetic(size, args.dim, seed=0))
            queries = synthetic(args.queries, args.dim, seed=1)
            with Index.open(d) as index:
                results[f"synthetic-{size}"] = measure(index, queries, args.k, tuple(args.kinds))
        real = None
        if args.flickr8k and args.minilm_captions:
            real = minilm_caption_embeddings(args.flickr8k, *args.minilm_captions)
        elif args.flickr8k:
            real = flickr8k_embeddings(
                args.flickr8k,
                args.model,
                args.batch_size,
                args.workers,
                tuple(args.flickr8k_splits),
                args.flickr8k_captions,
            )
        elif args.real_gallery and args.real_queries:
            real = np.load(args.real_gallery), np.load(args.real_queries)
        elif args.real_gallery:  # hold out the first --queries rows as queries (image-to-image)
            arr = np.load(args.real_gallery)
            real = arr[args.queries :], arr[: args.queries]
        if real is not None:
            gallery, queries = real
            d = Path(tmp) / "real"
            write_index(d, gallery.astype(np.float32))
            rng = np.random.default_rng(0)
            pick = rng.choice(len(queries), min(args.queries, len(queries)), replace=False)
            with Index.open(d) as index:
                results["real"] = measure(index, queries[pick].astype(np.float32), args.k, tuple(args.kinds))
    for name, rows in results.items():
        print(f"\n### {name}\n\n{table(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
