"""Encoder backends side by side in one run: torch eager, ONNX Runtime fp32, ONNX Runtime int8 (dynamic) and,
for CLIP, `transformers.CLIPModel` on the same weights; images and texts at each batch size.

Models: ViT-B/16 (random init, nothing downloaded) and the built-in starter. Every variant of one
(model, modality, batch) cell is timed in interleaved rounds (fastest round kept) so that load from
other users of the machine hits all of them alike; the ratios to torch eager are printed in the same run.
ONNX graphs are exported into ``$CALIBCLIP_CACHE/onnx`` on first use (export time printed, not timed).

    python bench/bench_encoders.py                                   # ViT-B/16 + starter, batch 1 and 32
    python bench/bench_encoders.py --models starter --batch-sizes 1 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_clip import CAPTIONS, _hf_model  # noqa: E402


def best_time(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Fastest of ``rounds`` interleaved calls of each function (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min())


def bench_model(name: str, batch_sizes: list[int], rounds: int, hf: bool) -> list[tuple]:
    from calibclip.models.onnx_backend import OnnxEncoder
    from calibclip.models.registry import create_model

    kwargs = {"pretrained": False} if name != "starter" else {}
    t0 = time.perf_counter()
    model = create_model(name, **kwargs)
    print(f"{name}: torch model built in {time.perf_counter() - t0:.1f} s", flush=True)
    variants: dict[str, object] = {"torch": model}
    for precision in ("fp32", "int8"):
        enc = OnnxEncoder(model, precision=precision)
        t0 = time.perf_counter()
        enc.prepare(("image", "text"))
        took = time.perf_counter() - t0
        print(f"{name}: onnx {precision} graphs ready in {took:.1f} s ({enc.export_dir})", flush=True)
        variants[f"onnx-{precision}"] = enc
    hf_model = _hf_model(model, torch.float32) if hf else None
    rows = []
    size = model.preprocess.size
    for batch in batch_sizes:
        pixels = torch.randn(batch, 3, *size)
        texts = (CAPTIONS * (batch // len(CAPTIONS) + 1))[:batch]
        tb = model.tokenize(texts)
        for modality in ("image", "text"):
            if modality == "image":
                fns = {k: (lambda m=m, x=pixels: m.encode_image(x)) for k, m in variants.items()}
                if hf_model is not None:
                    fns["transformers"] = lambda x=pixels: hf_model.get_image_features(pixel_values=x)
            else:
                fns = {k: (lambda m=m, t=tb: m.encode_text(t)) for k, m in variants.items()}
                if hf_model is not None:
                    fns["transformers"] = lambda t=tb: hf_model.get_text_features(
                        input_ids=t.input_ids, attention_mask=t.attention_mask
                    )
            with torch.inference_mode():
                ref = fns["torch"]()
                cos = {k: cosine(fns[k]() if k != "torch" else ref, ref) for k in variants}
                times = best_time(fns, rounds)
            for k, t in times.items():
                ratio = times["torch"] / t
                rows.append((name, modality, batch, k, batch / t, ratio, cos.get(k)))
                c = f"  cos {cos[k]:.5f}" if k in cos else ""
                print(
                    f"{name:9s} {modality:5s} b={batch:<3d} {k:13s} {batch / t:8.1f} /s   x{ratio:.2f} vs torch{c}",
                    flush=True,
                )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ViT-B/16", "starter"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per variant (fastest kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers.CLIPModel peer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, cpu count {os.cpu_count()}, torch {torch.__version__}", flush=True)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.batch_sizes, args.rounds, hf=not args.no_transformers and name != "starter")
    print("\n| model | input | batch | backend | items/s | x torch eager | min cosine to torch |")
    print("|---|---|---|---|---|---|---|")
    for name, modality, batch, k, rate, ratio, cos in rows:
        c = f"{cos:.5f}" if cos is not None else ""
        print(f"| {name} | {modality} | {batch} | {k} | {rate:.1f} | {ratio:.2f} | {c} |")


if __name__ == "__main__":
    main()
