"""The adversarial corpus (tests/adversarial/corpus.py): every generated case must be handled (a one-line
error or the right result; nothing crashed, wrong or lost), and docs/reliability.md must show the table that
the corpus produces now."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402

DOC = corpus.REPO / "docs" / "reliability.md"
CASES = [(area, name) for area, cases in corpus.ALL_CASES.items() for name in cases]


@pytest.fixture(scope="module")
def results() -> dict[tuple[str, str], corpus.Result]:
    torch.set_num_threads(1)
    return {(r.area, r.name): r for r in corpus.run_all()}


@pytest.mark.parametrize("area, name", CASES, ids=[f"{a}: {n}" for a, n in CASES])
def test_case_is_handled(results: dict, area: str, name: str) -> None:
    r = results[(area, name)]
    assert r.outcome == "handled", f"{area} / {name}: {r.outcome}: {r.detail}"


def test_reliability_doc_shows_current_table(results: dict) -> None:
    table = corpus.summary_table(list(results.values()))
    assert corpus.read_table(DOC) == table, (
        "docs/reliability.md is out of date: run `python tests/adversarial/corpus.py --write docs/reliability.md`"
    )
