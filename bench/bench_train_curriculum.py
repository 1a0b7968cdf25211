"""Curriculum ablation (none / image / text / both) on the synthetic person set of tests/test_train.py with a
tiny random CLIP, seeds 0-2: `python bench/bench_train_curriculum.py [OUT_DIR]` (docs/training.md)."""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_train import make_person_set, make_tiny_clip, write_config
from calibclip.training.config import load_train_settings
from calibclip.training.trainer import train

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ablate")
root.mkdir(parents=True, exist_ok=True)
ps = root / "data" / "CUHK-PEDES"
if not ps.exists():
    make_person_set(root / "data", train_ids=24, val_ids=6, test_ids=0, per_id=4)
clip = root / "tiny"
if not clip.exists():
    make_tiny_clip(clip)
modes = {"none": ([], []), "image": ([3, 5], []), "text": ([], [4, 6]), "both": ([3, 5], [4, 6])}
results = []
for seed in (0, 1, 2):
    for mode, (ie, te) in modes.items():
        cfg = write_config(
            root / f"{mode}.yaml",
            training={"epochs": 8, "batch_size": 16, "seed": seed, "losses": {"infonce": 1.0, "sdm": 1.0, "id": 0.0}},
            dcc={"image_curriculum_epochs": ie, "text_curriculum_epochs": te, "hardness_step": 0.125},
        )
        s = load_train_settings(cfg, {"data_root": str(ps.parent)})
        out = root / f"{mode}-s{seed}"
        t = time.time()
        summ = (
            train(s, out, checkpoint=str(clip), progress=False)
            if not (out / "train_log.json").exists()
            else json.loads((out / "train_log.json").read_text())
        )
        row = {
            "mode": mode,
            "seed": seed,
            "best_epoch": summ["best_epoch"],
            **summ["best_val"],
            "seconds": round(time.time() - t, 1),
        }
        print(json.dumps(row), flush=True)
        results.append(row)
(root / "results.json").write_text(json.dumps(results, indent=1))
