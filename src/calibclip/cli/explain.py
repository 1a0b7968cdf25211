"""`calibclip explain`: show what CalibCLIP does to one query and one image."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "explain",
        help="explain CalibCLIP calibration: dominant query words and the image's suppressed/decayed/retained tokens",
        description="Render the query words (dominant ones highlighted, masked ones in red) and the image's "
        "attention and CVE treatment maps into one PNG, and print the decisions.",
    )
    p.add_argument("--image", required=True, help="image file to explain")
    p.add_argument("--text", default=None, help="query text to explain (optional)")
    p.add_argument("--model", default="starter", help="registered model name or checkpoint path (default: starter)")
    p.add_argument(
        "--config",
        default=None,
        help="YAML with calibration settings (a `calibration:` section or a flat mapping) over the model's defaults",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one calibration setting, e.g. --set decay_factor=0.3 (repeatable)",
    )
    p.add_argument(
        "--rerank",
        nargs="?",
        const="packaged",
        default=None,
        metavar="PATH",
        help="also show the trained cross-modal re-ranker's view of (--text, --image): which query words attended "
        "to which image regions (cross-attention heatmaps; with --out also written to OUT.rerank.png) and its "
        "match and fused scores: the re-ranker shipped with the model (no value) or a re-ranker folder",
    )
    p.add_argument("--out", default=None, help="write the rendering to this PNG file")
    p.add_argument("--json", action="store_true", help="print the explanation data as JSON")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="model precision")
    return p


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from calibclip.calibration import CalibrationConfig, create_calibrator
    from calibclip.calibration.config import parse_overrides
    from calibclip.calibration.explain import render
    from calibclip.cli.search import check_text
    from calibclip.data.images import load_image
    from calibclip.models.registry import create_model

    check_text(args.text)
    if args.rerank is not None and args.text is None:
        raise ValueError("--rerank explains a (query, image) match: give --text too")
    image_path = Path(args.image)
    if not image_path.exists():
        raise FileNotFoundError(f"image {image_path} does not exist")
    model = create_model(args.model, device=args.device, precision=args.precision)
    cfg = CalibrationConfig.default_for(model.name)
    if args.config:
        cfg = CalibrationConfig.from_yaml(args.config, base=cfg)
    cfg = cfg.replace(**parse_overrides(args.overrides))
    cal = create_calibrator(model, config=cfg)
    image = load_image(image_path)
    pixels = model.preprocess(image)[None]
    shown = model.preprocess.to_image(image) if hasattr(model.preprocess, "to_image") else image
    with torch.inference_mode():
        image_feats = cal.image_features(pixels)
        (image_exp,) = cal.explain_image(pixels)
        text_exp, sims = None, {}
        if args.text is not None:
            (text_exp,) = cal.explain_text([args.text])
            text_feats = cal.text_features([args.text])
            for name in ("raw", "calibrated"):
                sims[name] = float(F.cosine_similarity(text_feats[name].float(), image_feats[name].float()).item())
    match = None
    if args.rerank is not None:
        from calibclip.calibration.reranker import create_reranking

        match = create_reranking(model, args.rerank).explain(args.text, pixels)
    data = {
        "model": model.name,
        "image": str(image_path),
        "config": cfg.to_dict(),
        "image_explanation": image_exp.to_dict(),
        "text_explanation": text_exp.to_dict() if text_exp else None,
        "similarity": sims,
    }
    if args.out:
        title = f"{model.name} | {image_path.name}"
        if sims:
            title += f" | cosine raw {sims['raw']:.3f}, calibrated {sims['calibrated']:.3f}"
        data["png"] = str(render(shown, text_exp, image_exp, args.out, title=title))
        if match is not None:
            from calibclip.calibration.reranker import render_match

            out = Path(args.out)
            data["rerank_png"] = str(render_match(shown, match, out.with_name(out.stem + ".rerank.png")))
    if match is not None:
        data["rerank"] = match.to_dict()
    if args.json:
        print(json.dumps(data))
        return 0
    counts = image_exp.counts()
    print(
        f"image {image_path.name}: grid {image_exp.grid[0]}x{image_exp.grid[1]}, "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
    )
    if text_exp is not None:
        print(f"query: {text_exp.text!r}")
        print(f"  dominant words: {text_exp.dominant_words or '-'}; masked: {text_exp.masked_words or '-'}")
        print(f"  re-encoded as:  {text_exp.masked_text!r}")
        print(f"  cosine(query, image): raw {sims['raw']:.4f}, calibrated {sims['calibrated']:.4f}")
    if match is not None:
        print(
            f"  re-ranker: cosine {match.similarity:.4f}, match {match.match:+.4f}, fused {match.fused:.4f}; "
            "word -> most attended region (row, col):"
        )
        w = match.grid[1]
        for word, m in zip(match.tokens, match.maps):
            cell = int(m.flatten().argmax())
            print(f"    {word:>14s} -> ({cell // w}, {cell % w})  weight {float(m.flatten()[cell]):.3f}")
    if args.out:
        print(f"wrote {data['png']}" + (f" and {data['rerank_png']}" if "rerank_png" in data else ""))
    return 0
