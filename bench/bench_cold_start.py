"""Cold start of a one-off `calibclip search INDEX --text ...` from the shell, with its breakdown.

Runs, each in a fresh Python process (``--runs`` times, median reported):
1. the real command (``python -m calibclip.cli.main search INDEX --text QUERY``): wall time to exit, and
   the process's CPU time (user + sys; on a shared machine wall time also counts waiting for a core);
2. the same steps instrumented: interpreter + CLI imports, ``import torch``, model construction,
   fingerprint, index open, first query (encode + search), each wall and CPU;
3. whether the search path imported modules it does not need (fastapi, matplotlib, faiss, skimage, ...).

    python bench/bench_cold_start.py INDEX_DIR [--text "a dog runs on the grass"] [--runs 3] [--backend torch]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROBE = r"""
import json, os, sys, time
t0 = time.perf_counter(); c0 = time.process_time()
marks = []
def mark(name):
    marks.append((name, time.perf_counter() - t0, time.process_time() - c0))
import argparse
from calibclip.cli.main import build_parser
args = build_parser().parse_args(["search", sys.argv[1], "--text", sys.argv[2], "--backend", sys.argv[3]])
mark("cli imports + parser")
import torch
mark("import torch")
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
print(json.dumps({"marks": marks, "heavy": heavy, "top": res[0].path if res else None}))
"""


def run_command(index: str, text: str, backend: str) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "calibclip.cli.main",
            "search",
            index,
            "--text",
            text,
            "--top-k",
            "10",
            "--backend",
            backend,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index")
    ap.add_argument("--text", default="a dog runs on the grass")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    args = ap.parse_args()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    print(f"cpu count {os.cpu_count()}, OMP_NUM_THREADS={env_threads}, load average {os.getloadavg()}")
    run_command(args.index, args.text, args.backend)  # warm the OS file cache (and any ONNX export) first
    walls, cpus = zip(*(run_command(args.index, args.text, args.backend) for _ in range(args.runs)))
    print(
        f"`calibclip search {args.index} --text ... --backend {args.backend}`: wall {statistics.median(walls):.2f} s "
        f"(runs {', '.join(f'{w:.2f}' for w in walls)}), CPU {statistics.median(cpus):.2f} s"
    )
    probes = []
    for _ in range(args.runs):
        out = subprocess.run(
            [sys.executable, "-c", PROBE, args.index, args.text, args.backend],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        probes.append(json.loads(out.strip().splitlines()[-1]))
    names = [m[0] for m in probes[0]["marks"]]
    print(f"\n| step | wall s (median of {args.runs}) | CPU s |")
    print("|---|---|---|")
    prev_w = prev_c = 0.0
    for i, name in enumerate(names):
        w = statistics.median(p["marks"][i][1] for p in probes)
        c = statistics.median(p["marks"][i][2] for p in probes)
        print(f"| {name} | {w - prev_w:.3f} | {c - prev_c:.3f} |")
        prev_w, prev_c = w, c
    print(f"| total in process (no interpreter start) | {prev_w:.3f} | {prev_c:.3f} |")
    print(f"\nheavy modules imported on the search path: {probes[0]['heavy'] or 'none'}")


if __name__ == "__main__":
    main()
