"""`calibclip train --resume` after `kill -9` equals the uninterrupted run; damaged/mismatched state is an error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import REPO, make_person_set, make_tiny_clip, write_config


def _cmd(cfg: Path, data: Path, out: Path, clip: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "calibclip.cli.main",
        "train",
        "--config",
        str(cfg),
        "--data-root",
        str(data),
        "--output-dir",
        str(out),
        "--checkpoint",
        str(clip),
        "--checkpoint-every",
        "1",
        "--no-progress",
        *extra,
    ]


def _history(out: Path) -> list[dict]:
    rows = json.loads((out / "train_log.json").read_text())["history"]
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


@pytest.mark.slow  # five training subprocesses
def test_resume_after_kill_9_equals_uninterrupted_run(tmp_path: Path) -> None:
    data = make_person_set(tmp_path / "data", train_ids=16, per_id=2)
    clip = make_tiny_clip(tmp_path / "tiny")
    cfg = write_config(
        tmp_path / "c.yaml",
        training={"epochs": 3, "losses": {"infonce": 1.0, "sdm": 0.5, "id": 0.0}},
        dcc={"image_curriculum_epochs": [2], "text_curriculum_epochs": [3]},
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    full = tmp_path / "full"
    done = subprocess.run(
        _cmd(cfg, data, full, clip), env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(cfg, data, killed, clip), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    while not (killed / "train_log.csv").exists() and time.time() < deadline:  # wait for the end of epoch 1
        time.sleep(0.02)
    time.sleep(0.15)  # then kill in the middle of epoch 2
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # no --resume: refuses to overwrite; --resume continues
    again = subprocess.run(
        _cmd(cfg, data, killed, clip), env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run(
        _cmd(cfg, data, killed, clip, "--resume"), env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _history(full), _history(killed)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=1e-6), k
    # a different setting is refused; a damaged state is a clear error
    other = subprocess.run(
        _cmd(cfg, data, killed, clip, "--resume", "--lr", "0.5"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert other.returncode == 2 and "other settings" in other.stderr and "lr" in other.stderr
    state = killed / "resume.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    broken = subprocess.run(
        _cmd(cfg, data, killed, clip, "--resume"), env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert broken.returncode == 2 and "corrupt" in broken.stderr
