"""`calibclip search`: text, image or composed (image + text) search of an index."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from calibclip.cli.common import add_backend_argument, apply_backend
from calibclip.cli.index import add_store_options, store_options, store_spec_help
from calibclip.index.stores import AUTO_THRESHOLD, ann_choices


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "search",
        help="search an index by text, image or image + text",
        description="Text-only (--text), image-only (--image) or composed (--image + --text: the index's Combiner "
        "if it has one, else the normalised sum of the two features).",
    )
    p.add_argument("index_dir", metavar="INDEX", help="index folder or store spec (" + store_spec_help() + ")")
    p.add_argument("--text", help="query text (or modification text with --image)")
    p.add_argument(
        "--image",
        metavar="PATH_OR_INDEXED_PATH",
        help="query/reference image: a path inside the indexed folder (uses its stored features), "
        "an index id as id:N, or any image file",
    )
    p.add_argument("--top-k", type=positive_int, default=10, help="number of results (default 10)")
    p.add_argument("--json", action="store_true", help='print one JSON object {"query": {...}, "results": [...]}')
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="CalibCLIP re-ranking of the top-K (needs an index built with --calibrate)",
    )
    p.add_argument(
        "--rerank",
        nargs="?",
        const="index",
        default=None,
        metavar="PATH",
        help="re-score the top-K of text queries with the trained cross-modal re-ranker over the index's stored "
        "image tokens: the index's own re-ranker (no value) or a re-ranker folder with the same image "
        "projection (needs an index built with `calibclip index ... --rerank`); combines with --calibrate",
    )
    p.add_argument(
        "--rerank-top-k",
        type=positive_int,
        default=None,
        metavar="K",
        help="with --rerank: candidates re-scored per query (default: the re-ranker's own top_k)",
    )
    p.add_argument(
        "--ann",
        default="auto",
        choices=ann_choices(),
        help=f"exact or approximate search (kinds of the store's backend); auto = exact up to "
        f"{AUTO_THRESHOLD:,} images, the backend's default ANN above",
    )
    p.add_argument("--nprobe", type=positive_int, default=None, help="IVF cells scanned per query (local default 32)")
    p.add_argument("--ef-search", type=positive_int, default=None, help="HNSW candidate list size (local default 128)")
    p.add_argument(
        "--include-reference",
        action="store_true",
        help="keep an indexed reference image in composed-search results (left out by default)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="NAME_OR_PATH",
        help="model to use (default: the one recorded in the index; another model is refused)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    add_store_options(p)
    add_backend_argument(p, precision=True)
    return p


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def check_text(text: str | None) -> str | None:
    """The query text, refused when it is blank or holds bytes that are not UTF-8 (which the shell passes
    through as lone surrogates).

    Raises:
        ValueError: blank text or undecodable bytes.
    """
    if text is None:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogateescape")
        raise ValueError(f"--text is not valid UTF-8 ({raw!r}); pass the query as UTF-8 text") from None
    if not text.strip():
        raise ValueError("--text is empty (only whitespace); give words to search for, or leave --text out")
    return text


def check_index_model(index_dir: str, model: str | None) -> None:
    """Refuse ``--model NAME`` (a registered model) other than the one ``index_dir`` was built with, before
    anything is loaded or downloaded. Paths and unrecorded models are left to the fingerprint check on open.

    Raises:
        ValueError: the names differ (the message says which model the index uses and what to do).
    """
    if model is None or os.path.exists(model):
        return
    from calibclip.index.stores import read_store_meta
    from calibclip.models.registry import canonical_name

    try:
        meta = read_store_meta(index_dir)
    except (OSError, ValueError, RuntimeError, ImportError):
        return  # opening the index reports what is wrong with it

    given = canonical_name(model)
    recorded = meta.get("model_spec") or meta.get("model")
    if given is None or not recorded or os.path.exists(str(recorded)):
        return
    if canonical_name(str(recorded)) != given:
        raise ValueError(
            f"--model {model}: index {index_dir} was built with model {recorded!r} (fingerprint "
            f"{meta.get('fingerprint')}); its vectors are not comparable "
            f"with {given!r}. Omit --model to use {recorded!r}, or build an index for {given!r}: "
            f"calibclip index IMAGES_DIR --out NEW_INDEX_DIR --model {model}"
        )


def _image_arg(value: str | None) -> int | str | None:
    if value is not None and value.startswith("id:") and value[3:].isdigit():
        return int(value[3:])
    return value


def run(args: argparse.Namespace) -> int:
    from calibclip.index import Index

    apply_backend(args)
    if args.text is None and not args.image:
        raise ValueError("give --text, --image or both")
    if args.rerank_top_k is not None and args.rerank is None:
        raise ValueError("--rerank-top-k only applies with --rerank")
    if args.rerank is not None and (args.image or not args.text):
        raise ValueError("--rerank applies to text queries (--text only), not to image or composed queries")
    check_text(args.text)
    image = _image_arg(args.image)
    check_index_model(args.index_dir, args.model)
    t0 = time.perf_counter()
    with Index.open(args.index_dir, model=args.model, device=args.device, store_options=store_options(args)) as index:
        if isinstance(image, int) and image not in index:
            raise ValueError(
                f"--image id:{image}: no image with that id in {args.index_dir} "
                f"(ids are shown by `calibclip search --json`)"
            )
        if args.calibrate and not index.has_calibrated:
            raise ValueError(
                f"index {args.index_dir} has no calibrated vectors; re-run `calibclip index IMAGES_DIR "
                f"--out {args.index_dir} --calibrate` to add them"
            )
        results = index.search(
            text=args.text,
            image=image,
            k=args.top_k,
            calibrate=args.calibrate,
            ann=args.ann,
            nprobe=args.nprobe,
            ef_search=args.ef_search,
            exclude_reference=not args.include_reference,
            rerank=args.rerank,
            rerank_top_k=args.rerank_top_k,
        )
        reranked = 0
        rerank_query: dict[str, object] = {}
        if args.rerank is not None:
            rr = index.reranking(args.rerank, args.rerank_top_k)
            reranked = int(rr.top_k)
            source = (index.reranker_info or {}).get("source") if args.rerank == "index" else args.rerank
            rerank_query = {
                "rerank": str(Path(source).resolve()) if source else None,
                "rerank_top_k": reranked,
            }
        composed = bool(args.text and args.image)
        query = {
            "text": args.text,
            "image": args.image,
            "top_k": args.top_k,
            "calibrate": args.calibrate,
            "ann": index.resolve_ann(args.ann),
            "model": index.model_name,
            "combining": (("combiner" if hasattr(index.combining(), "combiner") else "sum") if composed else None),
            **rerank_query,
        }
    from calibclip.index.storage import display

    if args.json:
        shown = [
            {
                **r.to_dict(),
                "path": display(r.path),
                "relpath": display(r.relpath),
                **({"reranked": r.rank <= reranked} if args.rerank is not None else {}),
            }
            for r in results
        ]
        out = {
            "query": {**query, "image": display(args.image) if args.image else None},
            "results": shown,
            "seconds": round(time.perf_counter() - t0, 4),
        }
        print(json.dumps(out))
        return 0
    for r in results:
        print(f"{r.rank:3d}  {r.score:.4f}  {display(r.path)}")
    return 0
