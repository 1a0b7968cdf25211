"""Cold start of a one-off `calibclip search INDEX --text ...` from the shell, with its breakdown.

Runs, each in a fresh Python process (``--runs`` times, median reported):
1. the real command (``python -m calibclip.cli.main search INDEX --text QUERY``): wall time to exit, and
   the process's CPU time (user + sys; on a shared machine wall time also counts waiting for a core);
2. the same steps instrumented in one process: ``import torch``, the CLI's imports and parser (as `main`
   builds it), index open, model load + fingerprint check, first query (encode + search), each wall and CPU;
3. whether the search path imported modules it does not need (fastapi, matplotlib, faiss, skimage, ...)
   and whether it built the starter's image tower.

``--baseline-src DIR`` runs every measurement a second time with ``PYTHONPATH=DIR`` (e.g. the ``src`` of a
checkout of the previous commit), interleaved with this tree's runs, so before/after come from one run.
The real command is also run once with an empty ``$CALIBCLIP_CACHE`` (the first search after installing:
no cached fingerprint yet).

    python bench/bench_cold_start.py INDEX_DIR [--text "a dog runs on the grass"] [--runs 3] [--backend torch]
        [--baseline-src ../main/src]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")

PROBE = r"""
import json, os, sys, time
t0 = time.perf_counter(); c0 = time.process_time()
marks = []
def mark(name):
    marks.append((name, time.perf_counter() - t0, time.process_time() - c0))
import torch
mark("import torch")
import argparse
from calibclip.cli import main as cli_main
argv = ["search", sys.argv[1], "--text", sys.argv[2], "--backend", sys.argv[3]]
parser_for = getattr(cli_main, "_parser_for", None)  # the one-subcommand parser main() builds, if this tree has it
args = (parser_for(argv) if parser_for else cli_main.build_parser()).parse_args(argv)
mark("cli imports + parser")
from calibclip.cli.common import apply_backend
apply_backend(args)
from calibclip.index import Index
mark("import calibclip.index")
index = Index.open(args.index_dir)
mark("index open")
enc = index.encoder
mark("model load + fingerprint check")
res = index.search(text=args.text, k=10)
mark("first query (encode + search)")
heavy = sorted(m for m in ("fastapi", "uvicorn", "matplotlib", "faiss", "skimage", "scipy", "transformers", "onnx",
                           "onnxruntime", "pandas") if m in sys.modules)
built = getattr(enc, "image_tower_built", None)
built = True if built is None else bool(built)
print(json.dumps({"marks": marks, "heavy": heavy, "top": res[0].path if res else None, "image_tower": built}))
"""


def _env(src: str, cache: str | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=src)
    if cache is not None:
        env["CALIBCLIP_CACHE"] = cache
    return env


def run_command(index: str, text: str, backend: str, src: str, cache: str | None = None) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "calibclip.cli.main", "search", index, "--text", text, "--top-k", "10"]
        + ["--backend", backend],
        check=True,
        stdout=subprocess.DEVNULL,
        env=_env(src, cache),
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def probe(index: str, text: str, backend: str, src: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, index, text, backend],
        check=True,
        capture_output=True,
        text=True,
        env=_env(src),
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index")
    ap.add_argument("--text", default="a dog runs on the grass")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    ap.add_argument("--baseline-src", help="also measure this source tree (PYTHONPATH), interleaved")
    args = ap.parse_args()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    print(f"cpu count {os.cpu_count()}, OMP_NUM_THREADS={env_threads}, load average {os.getloadavg()}")
    trees = {"this tree": SRC}
    if args.baseline_src:
        trees["baseline"] = str(Path(args.baseline_src).resolve())
    for src in trees.values():
        run_command(args.index, args.text, args.backend, src)  # warm the OS file cache (and caches) first
    with tempfile.TemporaryDirectory() as empty:
        first = {
            name: run_command(args.index, args.text, args.backend, src, cache=empty) for name, src in trees.items()
        }
    walls: dict[str, list[float]] = {n: [] for n in trees}
    cpus: dict[str, list[float]] = {n: [] for n in trees}
    probes: dict[str, list[dict]] = {n: [] for n in trees}
    for _ in range(args.runs):  # interleaved, so both trees see the same machine load
        for name, src in trees.items():
            w, c = run_command(args.index, args.text, args.backend, src)
            walls[name].append(w)
            cpus[name].append(c)
            probes[name].append(probe(args.index, args.text, args.backend, src))
    print(
        f"\n`calibclip search {args.index} --text ... --backend {args.backend}`, wall to exit (median of {args.runs}):"
    )
    print("\n| tree | wall s | runs | CPU s | first run, empty cache: wall / CPU s |")
    print("|---|---|---|---|---|")
    for name in trees:
        print(
            f"| {name} | {statistics.median(walls[name]):.2f} | {', '.join(f'{w:.2f}' for w in walls[name])} | "
            f"{statistics.median(cpus[name]):.2f} | {first[name][0]:.2f} / {first[name][1]:.2f} |"
        )
    names = [m[0] for m in probes["this tree"][0]["marks"]]
    head = " | ".join(f"{n} wall s | {n} CPU s" for n in trees)
    print(f"\n| step (in process, median of {args.runs}) | {head} |")
    print("|---" * (1 + 2 * len(trees)) + "|")
    prev = {n: (0.0, 0.0) for n in trees}
    for i, step in enumerate(names):
        cells = []
        for n in trees:
            w = statistics.median(p["marks"][i][1] for p in probes[n])
            c = statistics.median(p["marks"][i][2] for p in probes[n])
            cells.append(f"{w - prev[n][0]:.3f} | {c - prev[n][1]:.3f}")
            prev[n] = (w, c)
        print(f"| {step} | {' | '.join(cells)} |")
    print(f"| total in process (no interpreter start) | {' | '.join(f'{w:.3f} | {c:.3f}' for w, c in prev.values())} |")
    for n in trees:
        print(
            f"\n{n}: heavy modules imported on the search path: {probes[n][0]['heavy'] or 'none'}; "
            f"image tower built: {probes[n][0]['image_tower']}; top result {probes[n][0]['top']}"
        )


if __name__ == "__main__":
    main()
