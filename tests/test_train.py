"""`calibclip train`: a tiny random CLIP learns a synthetic person-retrieval set; checkpoints load and evaluate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}


def make_person_set(
    root: Path,
    train_ids: int = 24,
    val_ids: int = 6,
    test_ids: int = 6,
    per_id: int = 2,
    size: tuple[int, int] = (32, 16),
    seed: int = 0,
) -> Path:
    """A CUHK-PEDES-format folder (reid_raw.json + imgs/): each person is a (top colour, trousers colour)
    pair drawn as two bands with noise; captions name the colours. Splits use disjoint people."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    combos = [(a, b) for a in names for b in names if a != b]
    order = rng.permutation(len(combos))
    folder = root / "CUHK-PEDES"
    (folder / "imgs").mkdir(parents=True)
    entries = []
    pid = 0
    for split, count in (("train", train_ids), ("val", val_ids), ("test", test_ids)):
        for _ in range(count):
            top, bottom = combos[order[pid % len(combos)]]
            for k in range(per_id):
                h, w = size
                img = np.zeros((h, w, 3), dtype=np.float32)
                cut = h // 2 + int(rng.integers(-2, 3))
                img[:cut] = COLOURS[top]
                img[cut:] = COLOURS[bottom]
                img += rng.normal(0, 12, img.shape)
                rel = f"p{pid:03d}/{k}.png"
                (folder / "imgs" / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / "imgs" / rel)
                caps = [
                    f"a person wearing a {top} shirt and {bottom} trousers",
                    f"the man has {bottom} pants and a {top} top",
                ]
                entries.append({"split": split, "id": pid, "file_path": rel, "captions": caps})
            pid += 1
    (folder / "reid_raw.json").write_text(json.dumps(entries))
    return folder


def make_tiny_clip(folder: Path, image_size: tuple[int, int] = (32, 16), seed: int = 0) -> Path:
    """A random tiny ViT CLIP saved as a checkpoint folder."""
    from calibclip.models.clip import CLIP, CLIPConfig
    from calibclip.training.targets import save_clip

    torch.manual_seed(seed)
    model = CLIP(
        CLIPConfig(
            embed_dim=32,
            vision_layers=2,
            vision_width=64,
            vision_patch_size=8,
            image_size=image_size,
            text_width=64,
            text_layers=2,
            context_length=32,
            vocab_size=49408,
            name="tiny",
        )
    )
    save_clip(model, folder)
    return folder


TINY_TRAINING = {
    "epochs": 4,
    "batch_size": 8,
    "lr": 1e-3,
    "warmup_epochs": 1,
    "trainable": "all",
    "losses": {"infonce": 1.0, "sdm": 0.0, "id": 0.0},
    "eval_batch_size": 64,
}


def write_config(path: Path, training: dict | None = None, dcc: dict | None = None) -> Path:
    import yaml

    cfg = {
        "base": str(REPO / "configs" / "cuhkpedes.yaml"),
        "model": {"clip_image_size": [32, 16]},
        "training": {**TINY_TRAINING, **(training or {})},
    }
    if dcc is not None:
        cfg["model"]["dcc"] = dcc
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def person_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_person_set(tmp_path_factory.mktemp("person"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")


def test_tiny_clip_learns_person_retrieval(person_set: Path, tiny_clip: Path, tmp_path: Path) -> None:
    from calibclip.datasets import load_dataset
    from calibclip.models.registry import create_model
    from calibclip.training.config import load_train_settings
    from calibclip.training.trainer import _validate_encoder, train

    cfg = write_config(tmp_path / "cfg.yaml", dcc={"image_curriculum_epochs": [2], "text_curriculum_epochs": [3]})
    settings = load_train_settings(cfg, {"data_root": str(person_set)})
    val = load_dataset("cuhkpedes", person_set, "val")
    before = _validate_encoder(create_model(tiny_clip), val, 64)
    summary = train(settings, tmp_path / "out", checkpoint=str(tiny_clip), progress=False)
    hist = summary["history"]
    assert hist[-1]["train_loss"] < 0.7 * hist[0]["train_loss"]
    chance = 100.0 * 2 / 12  # 2 images of each of 6 val people
    best = summary["best_val"]["R@1"]
    assert best >= 2.5 * chance and best > before["R@1"] + 20
    assert hist[1]["hardness_image"] == 0.125 and hist[2]["hardness_text"] == 0.125
    assert hist[0]["neighbour_share"] == 0 and hist[2]["neighbour_share"] == pytest.approx(0.25)
    # the best checkpoint loads by path and gives the logged validation numbers
    model = create_model(tmp_path / "out" / "best")
    again = _validate_encoder(model, val, 64)
    assert again["R@1"] == pytest.approx(best, abs=1e-4)
    assert (tmp_path / "out" / "train_log.csv").read_text().count("\n") == len(hist) + 1
    assert (tmp_path / "out" / "train_curves.png").stat().st_size > 0


@pytest.mark.slow  # two subprocesses (~30 s on a busy 2-core machine)
def test_tools_train_seed_command_then_evaluate(person_set: Path, tiny_clip: Path, tmp_path: Path) -> None:
    """The seed's command verbatim (underscore flags) on a CUHK-PEDES folder; scripts/evaluate.py evaluates
    the written checkpoint and reproduces the logged validation metrics."""
    cfg = write_config(
        tmp_path / "cuhk.yaml", training={"epochs": 2, "losses": {"infonce": 0.0, "sdm": 1.0, "id": 1.0}}
    )
    out = tmp_path / "outputs"
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin", "CALIBCLIP_CACHE": str(tmp_path / "cache")}
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "train.py"),
            "--config",
            str(cfg),
            "--data_root",
            str(person_set),
            "--output_dir",
            str(out),
            "--checkpoint",
            str(tiny_clip),
            "--no_progress",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    line = json.loads(run.stdout.strip().splitlines()[-1])
    assert line["best_epoch"] in (1, 2) and set(line["best_val"]) >= {"R@1", "R@5", "R@10", "mAP", "mINP"}
    log = json.loads((out / "train_log.json").read_text())
    assert {"loss_sdm", "loss_id"} <= set(log["history"][0])
    ev = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "evaluate.py"),
            "--config",
            str(cfg),
            "--checkpoint",
            str(out / "best"),
            "--data_root",
            str(person_set),
            "--split",
            "val",
            "--json",
            "--output_dir",
            str(tmp_path / "results"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert ev.returncode == 0, ev.stderr[-2000:]
    metrics = json.loads(ev.stdout.strip().splitlines()[-1])["metrics"]
    for k in ("R@1", "R@5", "mAP", "mINP"):
        assert metrics[k] == pytest.approx(line["best_val"][k], abs=1e-3)


def test_bad_inputs_are_clear_errors(person_set: Path, tiny_clip: Path, tmp_path: Path) -> None:
    from calibclip.training.config import load_train_settings
    from calibclip.training.trainer import train

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dcc:\n    temprature: 0.1\n")
    with pytest.raises(ValueError, match="model.dcc.temprature"):
        load_train_settings(bad)
    bad.write_text("training:\n  epoch: 3\n")
    with pytest.raises(ValueError, match="training.epoch"):
        load_train_settings(bad)
    cve = tmp_path / "cve.yaml"
    cve.write_text("model:\n  cve: {enabled: true, num_heads: 8, num_layers: 2, dropout: 0.1}\n")
    assert load_train_settings(cve).cve["num_heads"] == 8
    settings = load_train_settings(write_config(tmp_path / "c.yaml"), {"data_root": str(person_set)})
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(settings, tmp_path / "new", checkpoint=str(tiny_clip), resume=True, progress=False)
    # unknown layout
    with pytest.raises(FileNotFoundError, match="reid_raw.json"):
        train(
            load_train_settings(write_config(tmp_path / "c.yaml"), {"data_root": str(tmp_path)}),
            tmp_path / "o",
            checkpoint=str(tiny_clip),
            progress=False,
        )
    # empty caption and missing image
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(person_set, broken)
    entries = json.loads((broken / "reid_raw.json").read_text())
    entries[0]["captions"] = ["   "]
    (broken / "reid_raw.json").write_text(json.dumps(entries))
    s2 = load_train_settings(write_config(tmp_path / "c.yaml"), {"data_root": str(broken)})
    with pytest.raises(FileNotFoundError, match="empty caption"):
        train(s2, tmp_path / "o2", checkpoint=str(tiny_clip), progress=False)
    (broken / "imgs" / entries[3]["file_path"]).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        train(s2, tmp_path / "o3", checkpoint=str(tiny_clip), progress=False)
    # a checkpoint of another architecture
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match="no CLIP weights"):
        train(settings, tmp_path / "o4", checkpoint=str(other), progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    person_set: Path, tiny_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from calibclip.training import targets
    from calibclip.training.config import load_train_settings
    from calibclip.training.trainer import train

    settings = load_train_settings(
        write_config(tmp_path / "c.yaml", training={"epochs": 2}), {"data_root": str(person_set)}
    )
    calls = {"n": 0}
    original = targets.CLIPTarget.loss

    def flaky(self, items, captions, flips):
        calls["n"] += 1
        loss, parts = original(self, items, captions, flips)
        return (loss * float("nan"), parts) if calls["n"] > 7 else (loss, parts)

    monkeypatch.setattr(targets.CLIPTarget, "loss", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="loss became nan at epoch 2 step 2"):
        train(settings, out, checkpoint=str(tiny_clip), progress=False)
    assert (out / "last" / "model.safetensors").exists() and (out / "resume.pt").exists()
    assert json.loads((out / "last" / "config.json").read_text())["training"]["epoch"] == 1


def test_resume_after_a_crash_mid_epoch_is_exact(
    person_set: Path, tiny_clip: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process twin of the kill -9 test (tests/test_train_resume.py, slow): a crash at any step, then
    --resume, gives the uninterrupted run's numbers (state saved every step)."""
    from calibclip.training import targets
    from calibclip.training.config import load_train_settings
    from calibclip.training.trainer import train

    settings = load_train_settings(
        write_config(
            tmp_path / "c.yaml",
            training={"epochs": 2, "checkpoint_every": 1, "losses": {"infonce": 1.0, "sdm": 0.5, "id": 0.5}},
            dcc={"image_curriculum_epochs": [2], "text_curriculum_epochs": [2]},
        ),
        {"data_root": str(person_set)},
    )
    full = train(settings, tmp_path / "full", checkpoint=str(tiny_clip), progress=False)["history"]
    original = targets.CLIPTarget.loss
    calls = {"n": 0}

    def crash(self, items, captions, flips):
        calls["n"] += 1
        if calls["n"] == 9:  # epoch 2, step 3
            raise KeyboardInterrupt
        return original(self, items, captions, flips)

    monkeypatch.setattr(targets.CLIPTarget, "loss", crash)
    with pytest.raises(KeyboardInterrupt):
        train(settings, tmp_path / "run", checkpoint=str(tiny_clip), progress=False)
    monkeypatch.setattr(targets.CLIPTarget, "loss", original)
    resumed = train(settings, tmp_path / "run", checkpoint=str(tiny_clip), resume=True, progress=False)["history"]
    for a, b in zip(full, resumed, strict=True):
        for k in a:
            if not k.endswith("_seconds"):
                assert a[k] == pytest.approx(b[k], abs=1e-6), k


def test_starts_from_an_irra_style_checkpoint_at_a_non_square_size(person_set: Path, tmp_path: Path) -> None:
    """IRRA's best.pth nests CLIP under model.base_model.* with extra heads and a 384x128-style (here 32x16)
    position grid; `--checkpoint` takes it as the starting weights."""
    from calibclip.models.clip import CLIP, CLIPConfig
    from calibclip.models.registry import create_model
    from calibclip.training.config import load_train_settings
    from calibclip.training.trainer import train

    torch.manual_seed(1)
    m = CLIP(
        CLIPConfig(
            embed_dim=32,
            vision_layers=2,
            vision_width=64,
            vision_patch_size=8,
            image_size=(32, 16),
            text_width=64,
            text_layers=2,
            context_length=32,
        )
    )
    state = {
        "model": {**{f"base_model.{k}": v for k, v in m.state_dict().items()}, "classifier.weight": torch.zeros(3, 32)}
    }
    torch.save(state, tmp_path / "best.pth")
    settings = load_train_settings(
        write_config(tmp_path / "c.yaml", training={"epochs": 1}), {"data_root": str(person_set)}
    )
    train(settings, tmp_path / "out", checkpoint=str(tmp_path / "best.pth"), progress=False)
    assert create_model(tmp_path / "out" / "best").config()["image_size"] == [32, 16]
