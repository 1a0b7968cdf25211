"""Architecture rooms: no module under src/calibclip imports a higher room (parsed with `ast`,
function-level imports included). Order: models < data < index, calibration < composed,
evaluation, training < web, cli."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "calibclip"
#: Room -> level; rooms on one level may not import each other either.
LEVELS = {
    "utils": 0,
    "models": 1,
    "data": 2,
    "index": 3,
    "calibration": 3,
    "composed": 4,
    "evaluation": 4,
    "training": 4,
    "web": 5,
    "cli": 6,
}
#: Top-level modules outside the rooms and the room they belong to.
TOP = {"datasets.py": "data", "__init__.py": None, "__main__.py": "cli"}


def room_of(path: Path, root: Path = SRC) -> str | None:
    rel = path.relative_to(root)
    if len(rel.parts) == 1:
        return TOP.get(rel.name, "cli")
    return rel.parts[0]


def imported_rooms(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """(line, room) of every ``calibclip.<room>`` import in a file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ["calibclip", *path.relative_to(root).parts[:-1]]
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
            if names[0] == "calibclip":  # `from calibclip import X`: only submodules count
                names = [
                    f"calibclip.{a.name}"
                    for a in node.names
                    if (root / a.name).is_dir() or (root / f"{a.name}.py").is_file()
                ]
        for name in names:
            parts = name.split(".")
            if parts[0] != "calibclip" or len(parts) < 2:
                continue
            target = parts[1] if parts[1] in LEVELS else TOP.get(parts[1] + ".py", "cli")
            if target:
                out.append((node.lineno, target))
    return out


def violations(root: Path = SRC) -> list[str]:
    """``file:line: room imports higher-room`` for every import of a higher room (same level is allowed)."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        room = room_of(path, root)
        if room is None:
            continue
        for _line, target in imported_rooms(path, root):
            if LEVELS[target] > LEVELS[room]:
                bad.append(f"{path.relative_to(root).as_posix()}: {room} imports {target}")
    return bad


#: Imports of a higher room that remain, each with what removes it. The list may only shrink.
KNOWN = {
    "models/starter_train.py: models imports data": "starter training belongs in the training room (issue 17)",
    "models/starter_train.py: models imports evaluation": "starter training belongs in the training room (issue 17)",
    "models/base.py: models imports data": "Encoder.encode decodes images with data.images.load_image",
    "models/clip.py: models imports data": "preprocessing (data.transforms.ImageTransform) lives in data",
    "models/starter.py: models imports data": "preprocessing (data.transforms.ImageTransform) lives in data",
    "index/build.py: index imports composed": "the index's Combiner (composed.build_combining)",
    "index/core.py: index imports composed": "the index's Combiner (composed.build_combining)",
}


def test_no_module_imports_a_higher_room() -> None:
    found = sorted(set(violations()))
    assert [v for v in found if v not in KNOWN] == []
    assert sorted(set(KNOWN) - set(found)) == [], "fixed: remove these from KNOWN"


def test_the_checker_sees_violations(tmp_path: Path) -> None:
    root = tmp_path / "calibclip"
    (root / "models").mkdir(parents=True)
    (root / "cli").mkdir()
    (root / "models" / "probe.py").write_text(
        "import calibclip.data.images\n\ndef f():\n    from calibclip.cli.main import main\n"
        "    from ..index import Index\n"
        "    from calibclip import models, __version__\n"
    )
    (root / "cli" / "ok.py").write_text("from calibclip.models import registry\nfrom .. import datasets\n")
    (root / "datasets.py").write_text("from calibclip.web import app\n")
    assert violations(root) == [
        "datasets.py: data imports web",
        "models/probe.py: models imports data",
        "models/probe.py: models imports cli",
        "models/probe.py: models imports index",
    ]
