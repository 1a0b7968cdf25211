"""The CLI's error boundary (issue 15 item 7): every expected failure is one line on stderr and exit 2,
an unexpected one is one line that points at --debug, a closed stdout (`| head`) ends quietly."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from calibclip.cli import main as cli_main
from calibclip.cli.main import main
from calibclip.models import registry

sys.path.insert(0, str(Path(__file__).parent))
from test_index_helpers import FakeEncoder, make_photo_folder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fake_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_ALIASES", {})
    monkeypatch.setattr(registry, "_loaded", True)
    registry.register_model("fake-test", lambda **kw: FakeEncoder(), pretrained="random")


@pytest.fixture()
def index_dir(tmp_path: Path, fake_models: None, capsys: pytest.CaptureFixture) -> str:
    make_photo_folder(tmp_path / "img")
    ix = str(tmp_path / "ix")
    assert main(["index", str(tmp_path / "img"), "--out", ix, "--model", "fake-test", "--workers", "0", "--quiet"]) == 0
    capsys.readouterr()
    return ix


def one_line_error(capsys: pytest.CaptureFixture, argv: list[str], code: int = 2) -> str:
    """Run the CLI expecting failure ``code`` with exactly one stderr line (argparse errors print usage
    first: only the last line counts for those)."""
    try:
        got = main(argv)
    except SystemExit as exc:  # argparse: usage + one error line, exit 2
        got = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert got == code, err
        assert "Traceback" not in "\n".join(err)
        return err[-1]
    err = capsys.readouterr().err.strip().splitlines()
    assert got == code, err
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["--image", "id:999999"], "id:999999"),  # was KeyError traceback
        (["--text", "dog", "--nprobe", "-5", "--ann", "ivf"], "--nprobe"),  # was OverflowError from FAISS
        (["--text", "dog", "--ef-search", "-1", "--ann", "hnsw"], "--ef-search"),  # was accepted
        (["--text", "dog", "--top-k", "0"], "--top-k"),
        (["--text", "\udcff\udcfe dog"], "UTF-8"),  # $'\xff\xfe dog' from a shell: was TypeError
        (["--text", "   "], "empty"),  # was searched (the web refuses it)
        (["--image", "no-such-file.jpg"], "no-such-file.jpg"),
    ],
)
def test_search_bad_arguments_one_line(index_dir, capsys, extra, expect):
    line = one_line_error(capsys, ["search", index_dir, *extra])
    assert expect in line and line.startswith("calibclip search: error:"), line


def test_search_on_missing_index_one_line(tmp_path, capsys, fake_models):
    line = one_line_error(capsys, ["search", str(tmp_path / "nope"), "--text", "dog"])
    assert "nope" in line


def _install_failing_command(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    real = cli_main.build_parser

    def build() -> argparse.ArgumentParser:
        parser = real()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        p = sub.add_parser("boom")

        def run(args: argparse.Namespace) -> int:
            raise exc

        p.set_defaults(func=run)
        return parser

    monkeypatch.setattr(cli_main, "build_parser", build)


def test_unexpected_error_one_line_with_debug_hint(monkeypatch, capsys):
    _install_failing_command(monkeypatch, ZeroDivisionError("division by zero"))
    line = one_line_error(capsys, ["boom"], code=1)
    assert "ZeroDivisionError" in line and "rerun with --debug for the traceback" in line
    with pytest.raises(ZeroDivisionError):  # --debug is global: before or after the command
        main(["boom", "--debug"])
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "boom"])


@pytest.mark.parametrize(
    "exc",
    [
        KeyError("image id(s) [3] not in index"),
        OSError(28, "No space left on device"),
        ImportError("No module named 'pymilvus'"),
    ],
)
def test_expected_errors_exit_2(monkeypatch, capsys, exc):
    _install_failing_command(monkeypatch, exc)
    line = one_line_error(capsys, ["boom"])
    assert line.startswith("calibclip boom: error:") and "'image id" not in line


def test_broken_pipe_in_process_is_quiet(monkeypatch, capsys):
    _install_failing_command(monkeypatch, BrokenPipeError(32, "Broken pipe"))
    assert main(["boom"]) == 141
    assert capsys.readouterr().err == ""


def test_piped_into_head_no_traceback(tmp_path, fake_models, capsys):
    """`calibclip info IX --skipped | head -1` with thousands of lines: no BrokenPipeError traceback."""
    img = tmp_path / "img"
    img.mkdir()
    for i in range(3000):
        (img / f"broken_{i:04d}.jpg").write_bytes(b"not a jpeg")
    make_photo_folder(tmp_path / "img" / "ok")
    ix = str(tmp_path / "ix")
    assert main(["index", str(img), "--out", ix, "--model", "fake-test", "--workers", "0", "--quiet"]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run(
        f"{sys.executable} -m calibclip.cli.main info {ix} --skipped | head -1",
        shell=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.startswith("store"), proc.stdout  # the first line of `info`
    assert proc.stderr == "", proc.stderr
