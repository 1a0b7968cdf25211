"""Serving cost of the trained cross-modal re-ranker (issue 12): index bytes per image, build time, and
per-query latency of plain vs re-ranked search (top-K = 20 by default), measured in one run.

On a small real set (the first N Flickr8k images, their first captions as queries) with the default
``starter`` model: one plain index and, per re-ranker width, one index built with ``--rerank`` (its stored
projected fp16 image tokens), then ``Index.search`` one query at a time, plain and re-ranked interleaved.
The re-ranker is **randomly initialised** (an untrained one has the same cost; pass ``--reranker PATH`` for
a trained one). Single thread by default.

    python bench/bench_rerank.py --images ../shared/data/flickr8k/Flicker8k_Dataset --n 200 --queries 100
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def random_reranker(encoder: object, folder: Path, width: int, layers: int, heads: int, top_k: int) -> Path:
    """A randomly initialised re-ranker for ``encoder`` (non-zero head, so it is no no-op) saved in ``folder``."""
    from calibclip.calibration.reranker import CrossModalReranker, RerankerConfig

    torch.manual_seed(0)
    cfg = RerankerConfig(
        token_dim=int(encoder.embed_dim),  # type: ignore[attr-defined]
        width=width,
        num_layers=layers,
        num_heads=heads,
        top_k=top_k,
        encoder=encoder.fingerprint(),  # type: ignore[attr-defined]
        encoder_name=encoder.name,  # type: ignore[attr-defined]
    )
    model = CrossModalReranker(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.02)
    model.save(folder, card={"note": "randomly initialised, for cost measurements only"})
    return folder


def queries_for(images: list[Path], token_file: Path | None, n: int) -> list[str]:
    """The first caption of each image (Flickr8k token file), else fixed generic queries."""
    caps: dict[str, str] = {}
    if token_file is not None and token_file.is_file():
        for line in token_file.read_text(errors="replace").splitlines():
            name, _, cap = line.partition("\t")
            key = name.split("#")[0]
            if cap and key not in caps:
                caps[key] = cap.strip()
    out = [caps[p.name] for p in images if p.name in caps]
    if not out:
        out = ["a dog runs on the grass", "a man riding a bike", "two children playing in the water"]
    return (out * (n // len(out) + 1))[:n]


def stats(ms: list[float]) -> dict[str, float]:
    arr = np.asarray(ms)
    return {
        "mean_ms": round(float(arr.mean()), 2),
        "p50_ms": round(float(np.percentile(arr, 50)), 2),
        "p90_ms": round(float(np.percentile(arr, 90)), 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default="../shared/data/flickr8k/Flicker8k_Dataset", help="folder of images")
    p.add_argument("--captions", default=None, help="Flickr8k.token.txt (default: beside --images)")
    p.add_argument("--n", type=int, default=200, help="images indexed (the first N, sorted by name)")
    p.add_argument("--queries", type=int, default=100, help="queries timed per mode")
    p.add_argument("--model", default="starter")
    p.add_argument("--widths", default="256", help="re-ranker widths to measure, comma-separated (default 256)")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=8)
    p.add_argument("--top-k", type=int, default=20, help="candidates re-scored per query (default 20)")
    p.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--reranker", default=None, help="a trained re-ranker folder instead of random ones")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", default=None, help="where the indexes go (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="open the indexes a previous run left in --workdir instead of building them (latency only; "
        "build times are then not measured)",
    )
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    from calibclip.index import Index
    from calibclip.models.registry import create_model

    src = Path(args.images)
    files = sorted(q for q in src.iterdir() if q.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.n]
    if not files:
        print(f"no images in {src}", file=sys.stderr)
        return 2
    captions = Path(args.captions) if args.captions else src.parent / "Flickr8k_text" / "Flickr8k.token.txt"
    texts = queries_for(files, captions, args.queries)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-rerank-"))
    gallery = work / "images"
    gallery.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = gallery / f.name
        if not link.exists():
            os.symlink(f.resolve(), link)
    encoder = create_model(args.model)
    result: dict[str, object] = {
        "model": args.model,
        "images": len(files),
        "queries": len(texts),
        "threads": args.threads,
        "top_k": args.top_k,
        "k": args.k,
        "reranker": args.reranker or "random (untrained)",
        "cpu": os.cpu_count(),
    }

    def build(out: Path, rerank: object) -> tuple[Index, float]:
        if args.reuse and (out / "meta.sqlite").is_file():
            return Index.open(out, model=encoder), float("nan")
        shutil.rmtree(out, ignore_errors=True)  # a full build each time, never an incremental no-op
        t0 = time.perf_counter()
        index = Index.build(gallery, out, model=encoder, workers=0, progress=False, rerank=rerank)
        return index, time.perf_counter() - t0

    for f in files:  # warm the page cache so that the first build does not pay for the disk alone
        f.read_bytes()
    plain, plain_s = build(work / "plain", None)
    result["plain_disk_bytes_per_image"] = round(plain.store.disk_bytes() / len(plain), 1)  # type: ignore[operator]
    rows = []
    widths = [0] if args.reranker else [int(w) for w in args.widths.split(",")]
    for width in widths:
        if args.reranker:
            rr_dir = Path(args.reranker)
        else:
            rr_dir = random_reranker(encoder, work / f"rr{width}", width, args.num_layers, args.num_heads, args.top_k)
        index, rr_s = build(work / f"rerank{width}", rr_dir)
        info = index.reranker_info or {}
        n_tok, w = info["tokens"]
        token_file = next((Path(index.location) / "vectors").glob("rerank.*.tok.f16"))
        rr = index.reranking(True, args.top_k)
        # warm-up (lazy searcher, re-ranker load, first forwards)
        for t in texts[:3]:
            index.search(t, k=args.k)
            index.search(t, k=args.k, rerank=True, rerank_top_k=args.top_k)
        plain_ms, rr_ms, forward_ms = [], [], []
        for t in texts:  # interleaved, one query at a time
            t0 = time.perf_counter()
            index.search(t, k=args.k)
            t1 = time.perf_counter()
            index.search(t, k=args.k, rerank=True, rerank_top_k=args.top_k)
            t2 = time.perf_counter()
            plain_ms.append((t1 - t0) * 1000)
            rr_ms.append((t2 - t1) * 1000)
            # the re-ranker's batched forward alone (K candidates, tokens from the index)
            _, x, pad = rr.text_inputs(t)
            cand = torch.from_numpy(index.rerank_tokens(index.ids[: args.top_k]))[None]
            sim = torch.zeros(1, cand.shape[1], dtype=torch.float64)
            t3 = time.perf_counter()
            rr.rescore(sim, x, pad, cand)
            forward_ms.append((time.perf_counter() - t3) * 1000)
        row = {
            "width": w,
            "layers": rr.reranker.config.num_layers,
            "heads": rr.reranker.config.num_heads,
            "tokens_per_image": n_tok,
            "token_bytes_per_image": 2 * n_tok * w,
            "token_file_bytes_per_image": round(token_file.stat().st_size / len(index), 1),
            "disk_bytes_per_image": round(index.store.disk_bytes() / len(index), 1),  # type: ignore[operator]
            "build_s": round(rr_s, 2),
            "plain": stats(plain_ms),
            "reranked": stats(rr_ms),
            "reranker_forward": stats(forward_ms),
            "added_p50_ms": round(statistics.median(rr_ms) - statistics.median(plain_ms), 2),
            "added_paired_p50_ms": round(statistics.median([b - a for a, b in zip(plain_ms, rr_ms)]), 2),
            "ratio_p50": round(statistics.median(rr_ms) / statistics.median(plain_ms), 3),
        }
        rows.append(row)
        index.close()
    plain.close()
    # a second plain build after the re-ranker ones: the plain build time is the mean of the two (the
    # machine's load drifts; builds of one kind are not all first or last)
    plain2, plain2_s = build(work / "plain2", None)
    plain2.close()
    plain_s = (plain_s + plain2_s) / 2
    result["plain_build_s"] = round(plain_s, 2)
    result["plain_build_runs_s"] = [round(plain_s * 2 - plain2_s, 2), round(plain2_s, 2)]
    for row in rows:
        row["build_ratio"] = round(row["build_s"] / plain_s, 3)
    result["rows"] = rows

    print(
        f"{result['images']} images, {result['queries']} queries, model {args.model}, {args.threads} thread(s), "
        f"K={args.top_k}, k={args.k}, re-ranker {result['reranker']}"
    )
    print(
        f"plain index build: {plain_s:.1f} s (mean of {result['plain_build_runs_s']}), "
        f"{result['plain_disk_bytes_per_image']} disk bytes/image"
    )
    print(
        "| width | tokens x width | token bytes/image | build s (x plain) | plain p50 ms | re-ranked p50 ms "
        "| added p50 ms (paired) | ratio | re-ranker forward p50 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['width']} | {r['tokens_per_image']} x {r['width']} | {r['token_bytes_per_image']:,} | "
            f"{r['build_s']} (x{r['build_ratio']}) | {r['plain']['p50_ms']} | {r['reranked']['p50_ms']} | "
            f"{r['added_p50_ms']} ({r['added_paired_p50_ms']}) | x{r['ratio_p50']} | "
            f"{r['reranker_forward']['p50_ms']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
