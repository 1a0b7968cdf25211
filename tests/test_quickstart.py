"""scripts/quickstart.sh: what it tells a new user (static checks), and (slow) that its own queries
succeed on its own sample photos with the starter model."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "quickstart.sh"

#: The photo each quickstart query must put first (the script's own claims).
EXPECTED_TOP = {
    "a tabby cat": "chelsea.png",
    "a man with a camera": "camera.png",
    "a woman in a military uniform": "grace_hopper.jpg",
    "a motorcycle": "motorcycle_left.png",
    "stars in the night sky": "hubble_deep_field.jpg",
    "a pile of coins": "coins.png",
}


def test_script_is_valid_and_tells_the_next_command() -> None:
    text = SCRIPT.read_text()
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert ". .venv/bin/activate" in text and "calibclip serve" in text
    assert text.count("step ") >= 5  # every step says what it demonstrates
    queries = re.search(r"QUERIES=\((.*?)\)", text, re.S).group(1)  # type: ignore[union-attr]
    assert set(re.findall(r'"([^"]+)"', queries)) == set(EXPECTED_TOP)


@pytest.mark.slow
def test_quickstart_queries_succeed_on_its_photos(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CALIBCLIP_QUICKSTART_USE_ACTIVE_ENV": "1",
        "CALIBCLIP_QUICKSTART_DIR": str(tmp_path / "qs"),
        "CALIBCLIP_CACHE": str(tmp_path / "cache"),
    }
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=1800, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for query, photo in EXPECTED_TOP.items():
        block = out.split(f'text query: "{query}"', 1)[1]
        first = [line for line in block.splitlines() if re.match(r"\s+1\s", line)][0]
        assert first.endswith(photo), (query, first)
    composed = out.split("composed query:", 1)[1]
    first = [line for line in composed.splitlines() if re.match(r"\s+1\s", line)][0]
    assert first.endswith("motorcycle_left.png")
    calibrated = out.split("plain vs calibrated text query", 1)[1]
    tops = [line for line in calibrated.splitlines() if re.match(r"\s+1\s", line)][:2]
    assert tops[1].endswith("rocket.jpg")  # the calibrated ranking puts the rocket first
    assert out.rstrip().splitlines()[-3].strip() == ". .venv/bin/activate"
