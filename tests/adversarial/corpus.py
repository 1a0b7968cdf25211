"""Adversarial corpus (issue 15): generates hostile folders, files and arguments, runs calibclip on each
in-process, and classifies every outcome.

Outcomes:
    handled  the run did the right thing: a clear one-line error (exit 2) where the input is unusable, the
             correct result where it is usable.
    crashed  a traceback, an unexpected exception type, or an exit status other than the expected one.
    wrong    a run that "succeeded" with a wrong result (NaN ranked, a corrupt index reported healthy,
             code executed from a pickle).
    lost     good data dropped because of a bad neighbour (a photo not indexed, a batch never committed).

Run it with ``python tests/adversarial/corpus.py`` (prints the summary table) or
``python tests/adversarial/corpus.py --write docs/reliability.md`` (rewrites the table there).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
for p in (str(TESTS), str(REPO / "src")):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

OUTCOMES = ("handled", "crashed", "wrong", "lost")
AREAS = ("index", "corruption", "cli", "loaders", "checkpoints")


@dataclass
class Result:
    area: str
    name: str
    outcome: str
    detail: str = ""


@dataclass
class Run:
    """One in-process CLI run."""

    code: int | None
    out: str
    err: str
    exc: BaseException | None = None

    @property
    def one_line_error(self) -> bool:
        lines = [ln for ln in self.err.strip().splitlines() if ln.strip()]
        return self.code == 2 and len(lines) >= 1 and "Traceback" not in self.err and self.exc is None


def cli(*argv: str) -> Run:
    """``calibclip ARGV`` in-process with captured stdout/stderr; never raises."""
    from calibclip.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    code: int | None = None
    exc: BaseException | None = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse errors
            code = int(e.code) if isinstance(e.code, int) else 2
        except BaseException as e:  # noqa: BLE001 - the corpus records everything
            exc = e
            err.write(traceback.format_exc())
    return Run(code, out.getvalue(), err.getvalue(), exc)


def register_toy_model() -> None:
    """The registry with the toy `FakeEncoder` as ``fake-test`` (fast, deterministic, no weights)."""
    from calibclip.models import registry
    from test_index_helpers import FakeEncoder

    registry.list_models()
    registry.register_model("fake-test", lambda **kw: FakeEncoder(), pretrained="random")


def photo(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    img.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), tuple(255 - c for c in colour)), (4, 4))
    img.save(path)
    return path


def good_folder(root: Path, n: int = 3) -> list[str]:
    names = []
    for i in range(n):
        names.append(f"good_{i}.png")
        photo(root / names[-1], ((60 * i) % 255, 100, 200 - 40 * i))
    return names


def index_json(images: Path, out: Path, *extra: str) -> tuple[Run, dict[str, Any] | None]:
    run = cli(
        "index",
        str(images),
        "--out",
        str(out),
        "--model",
        "fake-test",
        "--workers",
        "0",
        "--quiet",
        "--json",
        "--batch-size",
        "4",
        *extra,
    )
    try:
        return run, json.loads(run.out.strip().splitlines()[-1]) if run.code == 0 else None
    except (ValueError, IndexError):
        return run, None


# ------------------------------------------------------------------------------------------------------------
# index: hostile folders
# ------------------------------------------------------------------------------------------------------------
def _index_case(build: Callable[[Path], tuple[int, int]]) -> Callable[[Path], tuple[str, str]]:
    """A folder case: ``build(images)`` returns (good images, bad files); the run must index every good image,
    skip every bad file (listed by `info --skipped`), exit 0, and a re-run must change nothing."""

    def run(tmp: Path) -> tuple[str, str]:
        images = tmp / "img"
        images.mkdir()
        good, bad = build(images)
        r, report = index_json(images, tmp / "ix")
        if report is None:
            return ("crashed" if not r.one_line_error else "lost"), (r.err.strip().splitlines() or ["?"])[-1]
        if report["count"] != good:
            return "lost", f"{report['count']} of {good} good images indexed"
        if report["skipped"] != bad:
            return "wrong", f"{report['skipped']} skipped, expected {bad}"
        again, rep2 = index_json(images, tmp / "ix")
        if rep2 is None or rep2["count"] != good or rep2["added"] or rep2["removed"]:
            return "wrong", f"re-run changed the index: {rep2 or again.err[-200:]}"
        info = cli("info", str(tmp / "ix"), "--skipped")
        if info.code != 0 or info.exc:
            return "crashed", info.err[-200:]
        search = cli("search", str(tmp / "ix"), "--text", "a photo", "--top-k", str(max(good, 1)))
        if good and (search.code != 0 or len(search.out.strip().splitlines()) != good):
            return ("crashed" if search.exc else "wrong"), (search.err or search.out)[-200:]
        return "handled", f"{good} indexed, {bad} skipped"

    return run


def _non_utf8_name(images: Path) -> tuple[int, int]:
    good_folder(images)
    photo(Path(os.fsdecode(os.fsencode(str(images)) + b"/caf\xe9.png")))
    return 4, 0


def _non_utf8_broken_link(images: Path) -> tuple[int, int]:
    good_folder(images)
    os.symlink(b"/nonexistent/x\xe9.png", os.fsencode(str(images)) + b"/broken\xe9.jpg")
    return 3, 1


def _non_utf8_folder(images: Path) -> tuple[int, int]:
    sub = Path(os.fsdecode(os.fsencode(str(images)) + b"/dossier_\xe0_moi"))
    good_folder(sub, 2)
    good_folder(images, 1)
    return 3, 0


def _unicode_names(images: Path) -> tuple[int, int]:
    for i, name in enumerate(
        [
            "名前.png",
            "emoji_😀.png",
            "space name.png",
            "new\nline.png",
            "tab\tname.png",
            "quote'\".png",
            "back\\slash.png",
            "-leading-dash.png",
        ]
    ):
        photo(images / name, (30 * i, 90, 150))
    return 8, 0


def _long_name(images: Path) -> tuple[int, int]:
    good_folder(images, 1)
    photo(images / ("x" * 240 + ".png"))
    deep = images
    for i in range(30):
        deep = deep / f"d{i}"
    photo(deep / "deep.png")
    return 3, 0


def _bad_files(kind: str) -> Callable[[Path], tuple[int, int]]:
    def build(images: Path) -> tuple[int, int]:
        good_folder(images)
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
        data = buf.getvalue()
        target = images / f"bad_{kind}.jpg"
        if kind == "truncated_header":
            target.write_bytes(data[:40])
        elif kind == "truncated_data":
            target.write_bytes(data[: len(data) // 2])
        elif kind == "zero_bytes":
            target.write_bytes(b"")
        elif kind == "text_as_image":
            target.write_text("not an image\n" * 50)
        elif kind == "png_bomb":
            from test_index_helpers import bomb_png

            target = images / "bomb.png"
            target.write_bytes(bomb_png())
        elif kind == "wrong_extension":
            target = images / "really_a_png.jpg"
            Image.new("RGB", (30, 20), (9, 99, 199)).save(target, format="PNG")
            return 4, 0
        elif kind == "html_error_page":
            target.write_text("<html><body>403 Forbidden</body></html>")
        return 3, 1

    return build


def _links(kind: str) -> Callable[[Path], tuple[int, int]]:
    def build(images: Path) -> tuple[int, int]:
        good_folder(images)
        if kind == "broken":
            os.symlink(images / "missing.png", images / "dangling.png")
            return 3, 1
        if kind == "loop":
            os.symlink("b.jpg", images / "a.jpg")
            os.symlink("a.jpg", images / "b.jpg")
            return 3, 2
        if kind == "dir_loop":
            os.symlink("..", images / "up")
            (images / "sub").mkdir()
            os.symlink("../sub", images / "sub" / "again")
            return 3, 0
        if kind == "outside":  # a link to an image outside the folder is followed (documented)
            outside = photo(images.parent / "outside.png")
            os.symlink(outside, images / "linked.png")
            return 4, 0
        if kind == "duplicate":  # two links to one file: indexed once
            os.symlink("good_0.png", images / "alias.png")
            return 3, 0
        if kind == "to_device":
            os.symlink("/dev/zero", images / "zero.jpg")
            return 3, 1
        raise ValueError(kind)

    return build


def _fifo(images: Path) -> tuple[int, int]:
    good_folder(images)
    os.mkfifo(images / "pipe.jpg")  # opening it would block forever
    return 3, 1


def _dir_named_like_image(images: Path) -> tuple[int, int]:
    good_folder(images)
    (images / "folder.jpg").mkdir()
    photo(images / "folder.jpg" / "inside.png")
    return 4, 0


def _deleted_mid_run(when: str) -> Callable[[Path], tuple[str, str]]:
    """A file removed while the run is under way (after the scan; after decoding, before hashing)."""

    def run(tmp: Path) -> tuple[str, str]:
        import calibclip.index.build as build_mod

        images = tmp / "img"
        names = good_folder(images, 8)
        victim = images / names[3]
        patched: list[tuple[Any, str, Any]] = []

        def patch(obj: Any, attr: str, fn: Any) -> None:
            patched.append((obj, attr, getattr(obj, attr)))
            setattr(obj, attr, fn)

        if when == "after_scan":
            real_scan = build_mod.scan_images

            def scan_then_delete(*a: Any, **k: Any) -> Any:
                result = real_scan(*a, **k)
                victim.unlink()
                return result

            patch(build_mod, "scan_images", scan_then_delete)
        else:  # after the batch was decoded: the first hash of the victim finds it gone
            real_hash = build_mod.sha256_file

            def hash_after_delete(path: Any) -> str:
                if Path(path) == victim and victim.exists():
                    victim.unlink()
                return real_hash(path)

            patch(build_mod, "sha256_file", hash_after_delete)
        try:
            r, report = index_json(images, tmp / "ix")
        finally:
            for obj, attr, old in patched:
                setattr(obj, attr, old)
        if report is None:
            return ("crashed" if not r.one_line_error else "lost"), (r.err.strip().splitlines() or ["?"])[-1]
        if report["count"] != 7:
            return "lost", f"{report['count']} of 7 remaining images indexed"
        info = cli("info", str(tmp / "ix"), "--json", "--skipped")
        skipped = json.loads(info.out)["skipped_files"] if info.code == 0 else []
        if [s["reason"] for s in skipped] != ["missing"]:
            return "wrong", f"skipped: {skipped}"
        return "handled", "7 indexed, the vanished file skipped as missing"

    return run


def _nan_vectors(tmp: Path) -> tuple[str, str]:
    """An encoder producing NaN for one image: that file is skipped (non_finite), never ranked."""
    from calibclip.models import registry
    from test_index_helpers import FakeEncoder

    class NaNEncoder(FakeEncoder):
        def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
            out = super().encode_image(pixels)
            bad = pixels.flatten(1).mean(1) > 0.9  # the white image
            return torch.where(bad[:, None], torch.full_like(out, float("nan")), out)

    registry.register_model("fake-nan", lambda **kw: NaNEncoder(), pretrained="random")
    images = tmp / "img"
    good_folder(images, 3)
    Image.new("RGB", (40, 40), (255, 255, 255)).save(images / "white.png")
    r = cli(
        "index", str(images), "--out", str(tmp / "ix"), "--model", "fake-nan", "--workers", "0", "--quiet", "--json"
    )
    if r.code != 0:
        return ("crashed" if not r.one_line_error else "lost"), r.err[-200:]
    report = json.loads(r.out)
    s = cli("search", str(tmp / "ix"), "--text", "white", "--json")
    if s.code != 0:
        return "crashed", s.err[-200:]
    scores = [x["score"] for x in json.loads(s.out)["results"]]
    if report["count"] != 3 or any(not np.isfinite(v) for v in scores):
        return "wrong", f"count {report['count']}, scores {scores}"
    info = cli("info", str(tmp / "ix"), "--json", "--skipped")
    reasons = [x["reason"] for x in json.loads(info.out)["skipped_files"]]
    return ("handled", "white.png skipped as non_finite") if reasons == ["non_finite"] else ("wrong", str(reasons))


INDEX_CASES: dict[str, Callable[[Path], tuple[str, str]]] = {
    "non-UTF-8 file name": _index_case(_non_utf8_name),
    "non-UTF-8 broken symlink": _index_case(_non_utf8_broken_link),
    "non-UTF-8 folder name": _index_case(_non_utf8_folder),
    "unicode, spaces, newline, quotes in names": _index_case(_unicode_names),
    "240-char name, 30-deep folders": _index_case(_long_name),
    **{
        f"{k.replace('_', ' ')}": _index_case(_bad_files(k))
        for k in (
            "truncated_header",
            "truncated_data",
            "zero_bytes",
            "text_as_image",
            "png_bomb",
            "wrong_extension",
            "html_error_page",
        )
    },
    **{
        f"symlink: {k.replace('_', ' ')}": _index_case(_links(k))
        for k in ("broken", "loop", "dir_loop", "outside", "duplicate", "to_device")
    },
    "FIFO named .jpg": _index_case(_fifo),
    "folder named .jpg": _index_case(_dir_named_like_image),
    "file deleted after the scan": _deleted_mid_run("after_scan"),
    "file deleted between decoding and hashing": _deleted_mid_run("before_hash"),
    "NaN image vectors": _nan_vectors,
}


# ------------------------------------------------------------------------------------------------------------
# corruption: a damaged index folder
# ------------------------------------------------------------------------------------------------------------
def _built_index(tmp: Path) -> Path:
    images = tmp / "img"
    good_folder(images, 6)
    r, report = index_json(images, tmp / "ix")
    if report is None:
        raise RuntimeError(f"could not build the corpus index: {r.err[-300:]}")
    return tmp / "ix"


def _vector_files(ix: Path) -> list[Path]:
    return sorted(p for p in (ix / "vectors").rglob("*") if p.is_file())


def _corruption(
    damage: Callable[[Path], None], check_only: bool = False, expect: str = ""
) -> Callable[[Path], tuple[str, str]]:
    """Damage a healthy index; `info` (or `info --check` when the damage is only visible to a full scan)
    must report it (exit 2, one line) and `search` must refuse with one line, never a traceback."""

    def run(tmp: Path) -> tuple[str, str]:
        ix = _built_index(tmp)
        damage(ix)
        info = cli("info", str(ix), "--check") if check_only else cli("info", str(ix))
        search = cli("search", str(ix), "--text", "a photo")
        for what, r in (("info", info), ("search", search)):
            if r.exc is not None or "Traceback" in r.err:
                return "crashed", f"{what}: {type(r.exc).__name__ if r.exc else 'traceback'}: {r.err.strip()[-160:]}"
        if info.code == 0:
            return "wrong", "info reports a healthy index"
        if not info.one_line_error:
            return "crashed", f"info exit {info.code}: {info.err[-160:]}"
        if search.code == 0 and not check_only:
            return "wrong", "search answered from a damaged index"
        if expect and expect not in info.err:
            return "wrong", f"info does not say {expect!r}: {info.err.strip()[-160:]}"
        return "handled", info.err.strip().splitlines()[-1][:100]

    return run


def _truncate(fraction: float, which: str = "vectors") -> Callable[[Path], None]:
    def damage(ix: Path) -> None:
        files = [p for p in _vector_files(ix) if (which in p.name) or (which == "vectors" and "norm" not in p.name)]
        target = files[0]
        data = target.read_bytes()
        target.write_bytes(data[: int(len(data) * fraction)])

    return damage


def _delete_vectors(ix: Path) -> None:
    for p in _vector_files(ix):
        if "norm" not in p.name:
            p.unlink()
            return


def _garble_db(offset: int) -> Callable[[Path], None]:
    def damage(ix: Path) -> None:
        db = ix / "meta.sqlite"
        with sqlite3.connect(db) as conn:  # fold the WAL into the main file first
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        data = bytearray(db.read_bytes())
        for i in range(offset, min(len(data), offset + 512)):
            data[i] = (data[i] * 7 + 13) % 256
        db.write_bytes(bytes(data))
        for extra in ("meta.sqlite-wal", "meta.sqlite-shm"):
            (ix / extra).unlink(missing_ok=True)

    return damage


def _set_meta(key: str, value: Callable[[Any], Any]) -> Callable[[Path], None]:
    def damage(ix: Path) -> None:
        with sqlite3.connect(ix / "meta.sqlite") as conn:
            (old,) = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            conn.execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(value(json.loads(old))), key))

    return damage


def _nan_rows(ix: Path) -> None:
    target = next(p for p in _vector_files(ix) if "norm" not in p.name)
    arr = np.fromfile(target, dtype=np.float16)
    arr[:48] = np.nan  # the first 3 rows of 16-d vectors
    arr.tofile(target)


def _empty_db(ix: Path) -> None:
    (ix / "meta.sqlite").write_bytes(b"")
    for extra in ("meta.sqlite-wal", "meta.sqlite-shm"):
        (ix / extra).unlink(missing_ok=True)


CORRUPTION_CASES: dict[str, Callable[[Path], tuple[str, str]]] = {
    "vectors file truncated to 50%": _corruption(_truncate(0.5)),
    "vectors file truncated to 0 bytes": _corruption(_truncate(0.0)),
    "vectors file off by 3 bytes": _corruption(_truncate(0.99)),
    "vectors file deleted": _corruption(_delete_vectors),
    "norms file truncated": _corruption(_truncate(0.5, "norm")),
    "meta.sqlite header garbled": _corruption(_garble_db(0)),
    "meta.sqlite pages garbled": _corruption(_garble_db(4096)),
    "meta.sqlite emptied": _corruption(_empty_db),
    "rows in metadata too large": _corruption(_set_meta("rows", lambda v: v + 5)),
    "rows in metadata negative": _corruption(_set_meta("rows", lambda v: -1)),
    "dim in metadata wrong": _corruption(_set_meta("dim", lambda v: v * 2)),
    "dim in metadata not a number": _corruption(_set_meta("dim", lambda v: "sixteen")),
    "NaN rows in the vectors (info --check)": _corruption(_nan_rows, check_only=True, expect="non-finite"),
}


# ------------------------------------------------------------------------------------------------------------
# cli: hostile arguments (one-line errors, exit 2)
# ------------------------------------------------------------------------------------------------------------
def _cli_case(
    argv: Callable[[Path], list[str]], expect: str | None = None, code: int = 2
) -> Callable[[Path], tuple[str, str]]:
    """Hostile arguments: exit ``code`` (2: a one-line error containing ``expect``), never a traceback."""

    def run(tmp: Path) -> tuple[str, str]:
        ix = _built_index(tmp)
        r = cli(*argv(ix))
        if r.exc is not None or "Traceback" in r.err:
            return "crashed", (r.err.strip().splitlines() or ["?"])[-1][:160]
        if code == 0 and r.code == 0:
            return "handled", f"answered ({len(r.out.splitlines())} results)"
        if r.code != code:
            return "wrong", f"exit {r.code}: {(r.out or r.err)[-120:]}"
        last = r.err.strip().splitlines()[-1]
        if expect and expect not in last:
            return "wrong", last[:160]
        return "handled", last[:100]

    return run


CLI_CASES: dict[str, Callable[[Path], tuple[str, str]]] = {
    "search --image id:999999": _cli_case(lambda ix: ["search", str(ix), "--image", "id:999999"], "id:999999"),
    "search --nprobe -5": _cli_case(lambda ix: ["search", str(ix), "--text", "x", "--nprobe", "-5", "--ann", "ivf"]),
    "search --ef-search -1": _cli_case(
        lambda ix: ["search", str(ix), "--text", "x", "--ef-search", "-1", "--ann", "hnsw"]
    ),
    "search --top-k 0": _cli_case(lambda ix: ["search", str(ix), "--text", "x", "--top-k", "0"]),
    "search --top-k abc": _cli_case(lambda ix: ["search", str(ix), "--text", "x", "--top-k", "abc"]),
    "search --text non-UTF-8 bytes": _cli_case(lambda ix: ["search", str(ix), "--text", "\udcff\udcfe dog"], "UTF-8"),
    "search --text whitespace only": _cli_case(lambda ix: ["search", str(ix), "--text", "   \t "], "empty"),
    "search --text 10,000 words (truncated, answered)": _cli_case(
        lambda ix: ["search", str(ix), "--text", "dog " * 10000], code=0
    ),
    "search --text with NUL and control characters": _cli_case(
        lambda ix: ["search", str(ix), "--text", "dog\x00\x1b[31m cat"], code=0
    ),
    "search --image missing file": _cli_case(lambda ix: ["search", str(ix), "--image", "/nonexistent.jpg"]),
    "search --image a text file": _cli_case(lambda ix: ["search", str(ix), "--image", str(ix / "meta.sqlite")]),
    "search --ann bogus": _cli_case(lambda ix: ["search", str(ix), "--text", "x", "--ann", "bogus"]),
    "search a folder that is no index": _cli_case(lambda ix: ["search", str(ix.parent / "img"), "--text", "x"]),
    "search --model of another index": _cli_case(
        lambda ix: ["search", str(ix), "--text", "x", "--model", "starter"], "was built with model"
    ),
    "search --calibrate without calibrated vectors": _cli_case(
        lambda ix: ["search", str(ix), "--text", "x", "--calibrate"]
    ),
    "index --out is a file": _cli_case(
        lambda ix: ["index", str(ix.parent / "img"), "--out", str(ix / "meta.sqlite"), "--model", "fake-test"]
    ),
    "index --batch-size 0": _cli_case(
        lambda ix: ["index", str(ix.parent / "img"), "--out", str(ix), "--batch-size", "0"]
    ),
    "index missing folder": _cli_case(lambda ix: ["index", str(ix.parent / "nope"), "--out", str(ix)]),
    "info on a missing folder": _cli_case(lambda ix: ["info", str(ix.parent / "nope")]),
    "evaluate without dataset": _cli_case(lambda ix: ["evaluate", "--model", "fake-test"]),
    "evaluate on a folder that is no Flickr8k": _cli_case(
        lambda ix: ["evaluate", "--dataset", "flickr8k", "--data-root", str(ix.parent)], "Flickr8k"
    ),
    "explain with an unknown model": _cli_case(
        lambda ix: ["explain", "--image", str(ix.parent / "img" / "good_0.png"), "--model", "no-such-model"],
        "unknown model",
    ),
    "serve a missing index": _cli_case(lambda ix: ["serve", str(ix.parent / "nope")]),
    "serve --workers 0": _cli_case(lambda ix: ["serve", str(ix), "--workers", "0"]),
}


# ------------------------------------------------------------------------------------------------------------
# loaders: malformed annotation files
# ------------------------------------------------------------------------------------------------------------
def _loader_case(make: Callable[[Path], tuple[str, Path, str]]) -> Callable[[Path], tuple[str, str]]:
    """``make(tmp)`` writes a dataset and returns (dataset, root, split); loading it must raise a
    `DatasetError`/`ValueError` naming the offending file, nothing else."""

    def run(tmp: Path) -> tuple[str, str]:
        from calibclip.data.composed import load_cirr, load_fashioniq
        from calibclip.datasets import load_dataset

        dataset, root, split = make(tmp)
        opened: list[str] = []
        real_open = open

        def spy(file: Any, *a: Any, **k: Any) -> Any:
            opened.append(str(file))
            return real_open(file, *a, **k)

        import builtins

        builtins.open = spy  # type: ignore[assignment]
        try:
            if dataset == "cirr":
                load_cirr(root, split)
            elif dataset == "fashioniq":
                load_fashioniq(root, split, categories=["dress"])
            else:
                load_dataset(dataset, root, split)
        except (ValueError, OSError) as exc:
            message = str(exc)
            if any(str(root) in o and "etc" in o for o in opened) or any(o.startswith("/etc") for o in opened):
                return "wrong", f"opened {opened}"
            if str(root) not in message:
                return "wrong", f"message does not name the file: {message[:120]}"
            return "handled", message.replace(str(root), "ROOT")[:100]
        except Exception as exc:  # noqa: BLE001
            return "crashed", f"{type(exc).__name__}: {exc}"[:160]
        finally:
            builtins.open = real_open  # type: ignore[assignment]
        return "wrong", "loaded without complaint"

    return run


def _person(mutate: Callable[[list], Any], raw: bytes | None = None) -> Callable[[Path], tuple[str, Path, str]]:
    def make(tmp: Path) -> tuple[str, Path, str]:
        from fakes import make_person_dataset

        root = make_person_dataset(tmp / "cuhk", "cuhkpedes")
        ann = root / "reid_raw.json"
        if raw is not None:
            ann.write_bytes(raw)
        else:
            ann.write_text(json.dumps(mutate(json.loads(ann.read_text()))))
        return "cuhkpedes", root, "test"

    return make


def _karpathy(mutate: Callable[[dict], Any], raw: bytes | None = None) -> Callable[[Path], tuple[str, Path, str]]:
    def make(tmp: Path) -> tuple[str, Path, str]:
        from test_datasets_captions import make_karpathy

        root = make_karpathy(tmp / "k")
        ann = root / "dataset_flickr30k.json"
        if raw is not None:
            ann.write_bytes(raw)
        else:
            ann.write_text(json.dumps(mutate(json.loads(ann.read_text()))))
        return "karpathy", root, "test"

    return make


def _flickr_tokens(raw: bytes) -> Callable[[Path], tuple[str, Path, str]]:
    def make(tmp: Path) -> tuple[str, Path, str]:
        from fakes import make_flickr8k

        root = make_flickr8k(tmp / "f8k", n_images=3)
        token = root / "Flickr8k_text" / "Flickr8k.token.txt"
        token.write_bytes(token.read_bytes() + raw)
        return "flickr8k", root, "dev"

    return make


def _cirr(
    mutate_caps: Callable[[list], Any] | None = None, mutate_split: Callable[[dict], Any] | None = None
) -> Callable[[Path], tuple[str, Path, str]]:
    def make(tmp: Path) -> tuple[str, Path, str]:
        from test_loader_validation import make_cirr

        root = make_cirr(tmp / "cirr")
        for mutate, rel in (
            (mutate_caps, "captions/cap.rc2.val.json"),
            (mutate_split, "image_splits/split.rc2.val.json"),
        ):
            if mutate is not None:
                path = root / rel
                path.write_text(json.dumps(mutate(json.loads(path.read_text()))))
        return "cirr", root, "val"

    return make


def _fiq(names: Any) -> Callable[[Path], tuple[str, Path, str]]:
    def make(tmp: Path) -> tuple[str, Path, str]:
        from test_loader_validation import make_fashioniq

        root = make_fashioniq(tmp / "fiq")
        (root / "image_splits" / "split.dress.val.json").write_text(json.dumps(names))
        return "fashioniq", root, "val"

    return make


LOADER_CASES: dict[str, Callable[[Path], tuple[str, str]]] = {
    'CUHK "captions": 5': _loader_case(_person(lambda d: [{**d[0], "captions": 5}, *d[1:]])),
    "CUHK entry is a number": _loader_case(_person(lambda d: [7, *d])),
    "CUHK file is an object": _loader_case(_person(lambda d: {"annotations": d})),
    "CUHK file is truncated JSON": _loader_case(_person(lambda d: d, raw=b'[{"id": 1, "split"')),
    "CUHK file is Latin-1": _loader_case(_person(lambda d: d, raw=b'[{"captions": ["caf\xe9"]}]')),
    "CUHK file_path escapes the root": _loader_case(
        _person(lambda d: [{**d[0], "file_path": "../../../../etc/hostname"}, *d[1:]])
    ),
    "Karpathy file is a list": _loader_case(_karpathy(lambda d: d["images"])),
    "Karpathy images is a string": _loader_case(_karpathy(lambda d: {**d, "images": "x.jpg"})),
    "Karpathy image without sentences": _loader_case(
        _karpathy(lambda d: {**d, "images": [{k: v for k, v in d["images"][0].items() if k != "sentences"}]})
    ),
    "Karpathy file is not JSON": _loader_case(_karpathy(lambda d: d, raw=b"<html>")),
    "Karpathy file is UTF-16": _loader_case(_karpathy(lambda d: d, raw='{"images": []}'.encode("utf-16"))),
    "Flickr8k token file is Latin-1": _loader_case(_flickr_tokens(b"x.jpg#0\tcaf\xe9\n")),
    "CIRR captions file is a dict": _loader_case(_cirr(mutate_caps=lambda d: {"pairs": d})),
    "CIRR caption is a list": _loader_case(_cirr(mutate_caps=lambda d: [{**d[0], "caption": ["x"]}, *d[1:]])),
    "CIRR split path ../../etc/hostname": _loader_case(
        _cirr(mutate_split=lambda d: {**d, next(iter(d)): "../../../../etc/hostname"})
    ),
    "CIRR split path absolute": _loader_case(_cirr(mutate_split=lambda d: {**d, next(iter(d)): "/etc/hostname"})),
    "FashionIQ split name ../../etc/hostname": _loader_case(_fiq(["B001", "../../etc/hostname"])),
    "FashionIQ split is an object": _loader_case(_fiq({"B001": 1})),
}


# ------------------------------------------------------------------------------------------------------------
# checkpoints: hostile model files
# ------------------------------------------------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _tiny_clip() -> Any:
    from calibclip.models.clip import CLIP, CLIPConfig

    torch.manual_seed(0)
    return CLIP(
        CLIPConfig(
            embed_dim=16,
            vision_layers=1,
            vision_width=64,
            vision_patch_size=16,
            image_size=(32, 32),
            text_width=64,
            text_layers=1,
        )
    ).eval()


def _ckpt_case(make: Callable[[Path], Path], expect: str = "") -> Callable[[Path], tuple[str, str]]:
    """``make(tmp)`` writes a hostile model file; `create_model` must refuse it with a CheckpointError/
    ValueError (no code run: the marker file must not appear), and `explain --model FILE` exits 2 in one line."""

    def run(tmp: Path) -> tuple[str, str]:
        import calibclip

        path = make(tmp)
        marker = tmp / "pwned"
        try:
            calibclip.create_model(path)
        except (ValueError, OSError) as exc:
            if marker.exists():
                return "wrong", "code from the file was executed"
            if expect and expect not in str(exc):
                return "wrong", str(exc)[:160]
            photo(tmp / "q.png")
            r = cli("explain", "--image", str(tmp / "q.png"), "--model", str(path))
            if not r.one_line_error:
                return "crashed", r.err[-160:]
            return "handled", str(exc).replace(str(tmp), "TMP")[:100]
        except Exception as exc:  # noqa: BLE001
            return "crashed", f"{type(exc).__name__}: {exc}"[:160]
        return ("wrong", "code from the file was executed") if marker.exists() else ("wrong", "loaded")

    return run


def _raw_pickle(tmp: Path) -> Path:
    p = tmp / "raw.pt"
    p.write_bytes(pickle.dumps({"state_dict": _Evil(tmp / "pwned")}))
    return p


def _zip_pickle(tmp: Path) -> Path:
    p = tmp / "zipped.pth"
    torch.save({"state_dict": _tiny_clip().state_dict(), "hook": _Evil(tmp / "pwned")}, p)
    return p


def _torchscript_pickle(tmp: Path) -> Path:
    p = tmp / "script.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("script/code/__torch__.py", "")
        z.writestr("script/data.pkl", pickle.dumps(_Evil(tmp / "pwned"), protocol=2))
    return p


def _nan_weights(tmp: Path) -> Path:
    sd = _tiny_clip().state_dict()
    sd["text_projection"][0, 0] = float("nan")
    p = tmp / "nan.pt"
    torch.save(sd, p)
    return p


def _truncated(tmp: Path) -> Path:
    p = tmp / "trunc.pt"
    torch.save(_tiny_clip().state_dict(), p)
    p.write_bytes(p.read_bytes()[:5000])
    return p


def _truncated_safetensors(tmp: Path) -> Path:
    from safetensors.torch import save_file

    p = tmp / "trunc.safetensors"
    save_file({k: v.contiguous() for k, v in _tiny_clip().state_dict().items()}, str(p))
    p.write_bytes(p.read_bytes()[:3000])
    return p


def _text(tmp: Path) -> Path:
    p = tmp / "model.pt"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")  # an LFS pointer
    return p


def _small_vocab(tmp: Path) -> Path:
    sd = _tiny_clip().state_dict()
    sd["token_embedding.weight"] = sd["token_embedding.weight"][:1000].clone()
    p = tmp / "vocab.pt"
    torch.save(sd, p)
    return p


def _hf_dir(edit: Callable[[dict], None]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        from calibclip.models.checkpoints import openai_to_hf

        d = tmp / "hf"
        d.mkdir()
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in openai_to_hf(_tiny_clip().state_dict()).items()},
            str(d / "model.safetensors"),
        )
        cfg = {
            "vision_config": {"num_attention_heads": 1, "hidden_act": "quick_gelu"},
            "text_config": {"num_attention_heads": 1, "hidden_act": "quick_gelu"},
        }
        edit(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    return make


CHECKPOINT_CASES: dict[str, Callable[[Path], tuple[str, str]]] = {
    "raw pickle running os.system": _ckpt_case(_raw_pickle, "refused"),
    "torch.save zip with a pickled hook": _ckpt_case(_zip_pickle, "refused"),
    "TorchScript archive whose data.pkl runs code": _ckpt_case(_torchscript_pickle, "refused"),
    "NaN weights": _ckpt_case(_nan_weights, "NaN"),
    "truncated .pt": _ckpt_case(_truncated),
    "truncated .safetensors": _ckpt_case(_truncated_safetensors),
    "text file (Git LFS pointer)": _ckpt_case(_text, "looks like text"),
    "vocabulary smaller than the tokenizer's": _ckpt_case(_small_vocab, "vocabulary"),
    "HF config num_attention_heads 0": _ckpt_case(
        _hf_dir(lambda c: c["vision_config"].update(num_attention_heads=0)), "num_attention_heads"
    ),
    "HF config vision_config a list": _ckpt_case(_hf_dir(lambda c: c.update(vision_config=[1])), "vision_config"),
    "HF config vision_config a string": _ckpt_case(_hf_dir(lambda c: c.update(vision_config="x")), "vision_config"),
}

ALL_CASES: dict[str, dict[str, Callable[[Path], tuple[str, str]]]] = {
    "index": INDEX_CASES,
    "corruption": CORRUPTION_CASES,
    "cli": CLI_CASES,
    "loaders": LOADER_CASES,
    "checkpoints": CHECKPOINT_CASES,
}


def run_case(area: str, name: str) -> Result:
    """Run one case in a fresh temporary folder; any exception escaping the case itself counts as a crash."""
    register_toy_model()
    fn = ALL_CASES[area][name]
    with tempfile.TemporaryDirectory(prefix="calibclip-adv-") as tmp:
        cwd = os.getcwd()
        try:
            outcome, detail = fn(Path(tmp))
        except Exception as exc:  # noqa: BLE001
            outcome, detail = "crashed", f"{type(exc).__name__}: {exc}"[:160]
        finally:
            os.chdir(cwd)
            shutil.rmtree(tmp, ignore_errors=True)
    return Result(area, name, outcome, detail)


def run_all() -> list[Result]:
    """Every case, with the model registry restored afterwards (the corpus registers toy models)."""
    from calibclip.models import registry

    registry.list_models()
    saved = dict(registry._REGISTRY), dict(registry._ALIASES)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return [run_case(area, name) for area, cases in ALL_CASES.items() for name in cases]
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved[0])
        registry._ALIASES.clear()
        registry._ALIASES.update(saved[1])


def summary_table(results: list[Result]) -> str:
    """Markdown table: cases per area, tried / handled / crashed / wrong / lost."""
    lines = ["| area | tried | handled | crashed | wrong | lost |", "|---|---:|---:|---:|---:|---:|"]
    total: Counter = Counter()
    for area in AREAS:
        counts = Counter(r.outcome for r in results if r.area == area)
        tried = sum(counts.values())
        total.update(counts)
        lines.append(f"| {area} | {tried} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    lines.append(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[o]) for o in OUTCOMES) + " |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- adversarial-table:begin -->", "<!-- adversarial-table:end -->"


def write_table(doc: Path, table: str) -> None:
    """Replace the text between the table markers of ``doc``."""
    text = doc.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")


def read_table(doc: Path) -> str:
    return doc.read_text().split(BEGIN, 1)[1].split(END, 1)[0].strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the adversarial corpus and print its summary table.")
    p.add_argument("--write", metavar="DOC", help="rewrite the table between the markers of DOC")
    p.add_argument("--verbose", action="store_true", help="one line per case")
    args = p.parse_args(argv)
    os.environ.setdefault("CALIBCLIP_NO_PROGRESS", "1")
    warnings.filterwarnings("ignore", message="Detected pickle protocol")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = run_all()
    if args.verbose:
        for r in results:
            print(f"{r.outcome:8} {r.area:12} {r.name}: {r.detail}")
    table = summary_table(results)
    print(table, end="")
    print(f"({len(results)} cases in {time.perf_counter() - t0:.1f} s)")
    if args.write:
        write_table(Path(args.write), table)
    return 0 if all(r.outcome == "handled" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
