"""Time `retrieval_metrics` on a person-retrieval-sized matrix (default 20,000 x 20,000) and compare
with the straightforward full-sort reference (IRRA's `rank`: argsort of every row), run on a
smaller matrix and extrapolated linearly in the rows (or at full size with ``--ref-full``). Both the
informative case (``--noise``, default 1.0) and the worst case (i.i.d. random scores) run side by side.

    python bench/bench_metrics.py [--queries 20000] [--gallery 20000] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from calibclip.evaluation import caption_metrics, retrieval_metrics


def full_sort_reference(sim: torch.Tensor, q_ids: torch.Tensor, g_ids: torch.Tensor, chunk: int = 1000) -> dict:
    """IRRA `rank` (stable argsort of whole rows), chunked over queries to fit in memory."""
    n_q, n_g = sim.shape
    hits = {1: 0.0, 5: 0.0, 10: 0.0}
    ap_sum = inp_sum = 0.0
    steps = torch.arange(1, n_g + 1, dtype=torch.float64)
    for s in range(0, n_q, chunk):
        order = torch.sort(sim[s : s + chunk], dim=1, descending=True, stable=True).indices
        matches = g_ids[order] == q_ids[s : s + chunk, None]
        tmp = matches.cumsum(1)
        for k in hits:
            hits[k] += float((tmp[:, k - 1] > 0).sum())
        ap_sum += float(((tmp / steps) * matches).sum(1).div(matches.sum(1)).sum())
        last = n_g - 1 - torch.argmax(matches.flip(1).to(torch.int8), dim=1)
        inp_sum += float((matches.sum(1).double() / (last.double() + 1.0)).sum())
    out = {f"R@{k}": v / n_q * 100 for k, v in hits.items()}
    out.update(mAP=ap_sum / n_q * 100, mINP=inp_sum / n_q * 100)
    return out


def make_case(
    n_q: int, n_g: int, per_id: int, seed: int, noise: float, dim: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine similarities of noisy copies of per-identity prototype features (``noise=inf``:
    i.i.d. random scores, the worst case where positives rank anywhere)."""
    gen = torch.Generator().manual_seed(seed)
    n_ids = max(1, n_g // per_id)
    g_ids = torch.randint(0, n_ids, (n_g,), generator=gen)
    g_ids[:n_ids] = torch.arange(n_ids)
    q_ids = g_ids[torch.randint(0, n_g, (n_q,), generator=gen)]
    if noise == float("inf"):
        return torch.rand(n_q, n_g, generator=gen), q_ids, g_ids
    proto = torch.randn(n_ids, dim, generator=gen)
    g = torch.nn.functional.normalize(proto[g_ids] + noise * torch.randn(n_g, dim, generator=gen), dim=1)
    q = torch.nn.functional.normalize(proto[q_ids] + noise * torch.randn(n_q, dim, generator=gen), dim=1)
    return q @ g.T, q_ids, g_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--gallery", type=int, default=20000)
    ap.add_argument("--per-id", type=int, default=4, help="mean gallery images per identity")
    ap.add_argument("--ref-queries", type=int, default=2000, help="rows for the reference timing")
    ap.add_argument("--ref-full", action="store_true", help="run the reference on the full matrix too")
    ap.add_argument(
        "--noise",
        type=float,
        default=1.0,
        help="feature noise of the synthetic identities ('inf': i.i.d. random scores)",
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    for label, noise in (("informative", args.noise), ("random", float("inf"))):
        sim, q_ids, g_ids = make_case(args.queries, args.gallery, args.per_id, seed=0, noise=noise)
        t0 = time.perf_counter()
        fast = retrieval_metrics(sim, q_ids, g_ids)
        t_fast = time.perf_counter() - t0
        shown = {k: round(v, 3) for k, v in fast.items()}
        print(
            f"[{label}] retrieval_metrics {args.queries}x{args.gallery} ({args.threads} threads): {t_fast:.2f} s  {shown}"
        )

        n_ref = args.queries if args.ref_full else min(args.ref_queries, args.queries)
        t0 = time.perf_counter()
        ref = full_sort_reference(sim[:n_ref], q_ids[:n_ref], g_ids)
        t_ref = time.perf_counter() - t0
        sub = retrieval_metrics(sim[:n_ref], q_ids[:n_ref], g_ids)
        diff = max(abs(sub[k] - ref[k]) for k in ref)
        t_ref_full = t_ref * args.queries / n_ref
        how = "measured" if n_ref == args.queries else f"extrapolated from {n_ref} rows"
        print(f"[{label}] full-sort reference {n_ref}x{args.gallery}: {t_ref:.2f} s (max |diff| vs fast = {diff:.2e})")
        print(
            f"[{label}] full-sort reference {args.queries}x{args.gallery}: {t_ref_full:.1f} s ({how}); "
            f"speed-up {t_ref_full / t_fast:.1f}x"
        )
        del sim

    n_img = min(args.gallery, args.queries) // 5
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n_img, 64, generator=gen)
    cap_img = torch.arange(n_img).repeat_interleave(5)
    captions = images[cap_img] + args.noise * torch.randn(len(cap_img), 64, generator=gen)
    cap_sim = torch.nn.functional.normalize(captions, dim=1) @ torch.nn.functional.normalize(images, dim=1).T
    t0 = time.perf_counter()
    caption_metrics(cap_sim, cap_img)
    print(f"caption_metrics {len(cap_img)} captions x {n_img} images (t2i and i2t): {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
