"""Throughput of calibclip's CLIP against `transformers.CLIPModel` on the same random weights.

For each shape (ViT-B/16, ViT-B/32; random init, nothing downloaded) the script builds calibclip's
model, copies its weights into an equivalent `transformers.CLIPModel` (checked: max |diff| of the
fp32 features), then times ``encode_image`` / ``get_image_features`` and ``encode_text`` /
``get_text_features`` for each batch size and precision (calls interleaved, fastest round kept),
and prints images/s, texts/s and the ratio calibclip / transformers. Both sides get the same text
batch padded to its longest caption (as ``CLIPProcessor(padding=True)`` would), run under
``torch.inference_mode``.

    python bench/bench_clip.py                       # defaults: both shapes, batch 1 and 32, fp32 and bf16
    python bench/bench_clip.py --iters 3 --threads 2 --models ViT-B/32 --batch-sizes 32 --precisions fp32
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

CAPTIONS = [
    "a photo of a dog running on the beach",
    "two people riding bicycles down a city street at night",
    "a red car parked next to a tree",
    "a bowl of soup with bread on a wooden table",
]


def _hf_model(model, dtype: torch.dtype):
    import transformers

    from calibclip.models.checkpoints import openai_to_hf

    cfg = model.cfg
    hf_cfg = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=cfg.text_width,
            intermediate_size=4 * cfg.text_width,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.context_length,
            hidden_act=cfg.act,
            eos_token_id=49407,
            bos_token_id=49406,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=cfg.vision_width,
            intermediate_size=4 * cfg.vision_width,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads,
            image_size=cfg.image_size[0],
            patch_size=cfg.vision_patch_size,
            hidden_act=cfg.act,
        ),
        projection_dim=cfg.embed_dim,
    )
    hf = transformers.CLIPModel(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(openai_to_hf(model.state_dict()), strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight transfer failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return hf.to(dtype).requires_grad_(False)


def _features(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


def _cell(ours, hf, bs: int, args: argparse.Namespace) -> tuple[float, float, float, float]:
    """images/s and texts/s of calibclip and transformers for one batch size.

    The four calls are interleaved in every round so that load changes on a shared machine hit both
    sides alike; each rate uses the fastest of ``iters`` rounds (after ``warmup`` rounds).
    """
    px = torch.randn(bs, 3, *ours.cfg.image_size, device=args.device, dtype=ours.dtype)
    batch = ours.tokenize([CAPTIONS[i % len(CAPTIONS)] for i in range(bs)]).to(args.device)
    calls: list[Callable[[], object]] = [
        lambda: ours.encode_image(px),
        lambda: hf.get_image_features(pixel_values=px),
        lambda: ours.encode_text(batch),
        lambda: hf.get_text_features(input_ids=batch.input_ids, attention_mask=batch.attention_mask),
    ]
    best = [float("inf")] * len(calls)
    with torch.inference_mode():
        for round_ in range(args.warmup + args.iters):
            for i, fn in enumerate(calls):
                start = time.perf_counter()
                fn()
                if args.device != "cpu":
                    torch.cuda.synchronize()
                if round_ >= args.warmup:
                    best[i] = min(best[i], time.perf_counter() - start)
    return tuple(bs / t for t in best)  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ViT-B/16", "ViT-B/32"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--iters", type=int, default=3, help="timed rounds per cell (fastest reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import calibclip

    rows = []
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, iters {args.iters}")
    for name in args.models:
        torch.manual_seed(0)
        base = calibclip.create_model(name, pretrained=False)
        hf32 = _hf_model(base, torch.float32)
        pixels = torch.randn(2, 3, *base.cfg.image_size)
        ids = calibclip.tokenize(CAPTIONS[:2])
        with torch.inference_mode():
            d_img = (base.encode_image(pixels) - _features(hf32.get_image_features(pixel_values=pixels))).abs().max()
            d_txt = (base.encode_text(ids) - _features(hf32.get_text_features(input_ids=ids))).abs().max()
        print(f"{name}: same weights, fp32 max |diff| image {d_img:.2e}, text {d_txt:.2e}")
        del hf32
        for precision in args.precisions:
            ours = calibclip.create_model(name, pretrained=False, device=args.device, precision=precision)
            ours.load_state_dict(base.state_dict())
            hf = _hf_model(base, ours.dtype).to(args.device)
            for bs in args.batch_sizes:
                rows.append((name, precision, bs, *_cell(ours, hf, bs, args)))
                print(
                    f"  {precision} batch {bs}: images/s {rows[-1][3]:.1f} vs {rows[-1][4]:.1f}, "
                    f"texts/s {rows[-1][5]:.1f} vs {rows[-1][6]:.1f}",
                    flush=True,
                )
    print()
    print(
        "| model | precision | batch | calibclip img/s | transformers img/s | ratio | calibclip txt/s "
        "| transformers txt/s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, precision, bs, io, ih, to, th in rows:
        print(
            f"| {name} | {precision} | {bs} | {io:.1f} | {ih:.1f} | {io / ih:.2f} | {to:.1f} | {th:.1f} | "
            f"{to / th:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
