"""tools/tune_calibration.py (the research tuning script, outside the library) on a tiny generated
Flickr8k with the colour fake: the grid runs, and the chosen configuration measured from cached views
agrees with the public calibrator API (the tool checks it and raises otherwise)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from fakes import make_flickr8k

REPO = Path(__file__).resolve().parents[1]


def load_tool():
    spec = importlib.util.spec_from_file_location("tune_calibration", REPO / "tools" / "tune_calibration.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tune_tool_grid_and_measurement(tmp_path: Path, color_model: str) -> None:
    tool = load_tool()
    root = make_flickr8k(tmp_path / "f8k", n_images=6)
    out = tmp_path / "tune.json"
    threads = torch.get_num_threads()
    try:
        assert (
            tool.main(
                [
                    "--data-root",
                    str(root),
                    "--model",
                    color_model,
                    "--out",
                    str(out),
                    "--threads",
                    "1",
                    "--set",
                    "top_k=3",
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    grid = result["grid"]
    n_text = 1 + (len(tool.SELECTION_GRID) - 1) * len(tool.TEXT_MIX)
    assert len(grid["runs"]) == len(tool.VISUAL_GRID) * n_text * (1 + len(tool.TOP_K) * len(tool.LAM))
    measure = result["measure"]
    assert measure["plain"] == grid["baseline"] and measure["config"]["top_k"] == 3
    assert result["split"] == "dev" and result["fingerprint"].startswith("color-test-")
    assert set(measure) >= {"calibrated", "cve_only", "dcc_only", "latency_ms_per_query"}
