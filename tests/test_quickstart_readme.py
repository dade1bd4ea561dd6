"""The README's quickstart tables are what the quickstart prints: the real quickstart (the same
configs, pretraining, fine-tuning, registration and certification by alias) is run here and every
number of the README's block must be within the stated tolerance (``make readme-table`` rewrites
the block from a fresh run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayrcm import quickstart

README = Path(__file__).resolve().parents[1] / "README.md"


def _block() -> str:
    text = README.read_text()
    return text[text.index(quickstart.README_BEGIN):text.index(quickstart.README_END)]


def test_the_readme_block_parses_into_both_tables():
    numbers = quickstart.readme_numbers(_block())
    assert {"clean", "sigma=0.25", "sigma=0.5", "quickstart 0.00", "quickstart 0.25", "quickstart 0.50",
            "quickstart ACR", "quickstart abstain", "quickstart images"} <= set(numbers)
    assert numbers["quickstart images"] == 90
    assert "make readme-table" in _block() and f"within {quickstart.TOLERANCE}" in _block()


@pytest.mark.slow
def test_a_fresh_quickstart_prints_the_readme_tables(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no mlflow.db, no results to resume
    out = quickstart.run()
    printed = capsys.readouterr().out
    got, want = quickstart.readme_numbers(printed), quickstart.readme_numbers(_block())
    assert set(got) == set(want)
    drift = {k: (want[k], got[k]) for k in want if abs(got[k] - want[k]) > quickstart.TOLERANCE + 1e-9}
    assert got["quickstart images"] == want["quickstart images"] == 90
    assert not drift, f"README drifted from a fresh run ({{key: (README, run)}}; `make readme-table` rewrites it): {drift}"
    block = quickstart.readme_block(out)
    assert quickstart.readme_numbers(block) == got  # what make readme-table would write is what was printed
