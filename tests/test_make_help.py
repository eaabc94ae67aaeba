"""`make` (its default goal, help) lists every target the Makefile declares, as the README
promises: names with digits (`bench-e2e`) and dots too, each with its `## ` description (the
real Makefile, run by make)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def make_help(makefile: Path) -> dict[str, str]:
    """Target name -> description, as `make` with no goal prints them."""
    p = subprocess.run(
        ["make", "--no-print-directory", "-f", str(makefile)],
        cwd=makefile.parent, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    rows = [line.split(None, 1) for line in p.stdout.splitlines()]
    return {name: text for name, text in rows}


@pytest.fixture(autouse=True)
def _needs_make() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")


def test_help_lists_every_phony_target_of_the_real_makefile() -> None:
    makefile = REPO / "Makefile"
    phony = re.search(r"^\.PHONY:(.*)$", makefile.read_text(), re.M)
    assert phony is not None
    listed = make_help(makefile)
    assert "bench-e2e" in listed
    assert sorted(set(phony.group(1).split()) - set(listed)) == []


def test_help_lists_targets_named_with_digits_dots_and_underscores(tmp_path: Path) -> None:
    makefile = tmp_path / "Makefile"
    extra = "\nbench-e2e-v2: ## with digits\n\ttrue\nx86_64.img: ## with a dot\n\ttrue\n"
    makefile.write_text((REPO / "Makefile").read_text() + extra)
    listed = make_help(makefile)
    assert listed["bench-e2e-v2"] == "with digits"
    assert listed["x86_64.img"] == "with a dot"
