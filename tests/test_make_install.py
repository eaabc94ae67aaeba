"""`make`'s install step says what it does while it does it: one line per step, one per package
pip collects, and on failure one line naming pip's log (the real Makefile, run by make, with a
Python whose venv's pip prints what pip prints: no network, no real install)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/bin/bash
# `python -m venv DIR`: a venv whose pip prints pip's lines (and fails when asked to)
mkdir -p "$3/bin"
cat > "$3/bin/pip" <<'PIP'
#!/bin/bash
[ "$*" = "install -q --upgrade pip" ] && exit 0
echo "Obtaining file:///src"
echo "Collecting grpcio>=1.60 (from camelot==0.1.0)"
echo "  Downloading grpcio-1.66.whl (5.8 MB)"
echo "Collecting numpy"
echo "Installing collected packages: numpy, grpcio"
[ -n "$FAIL" ] && { echo "ERROR: No matching distribution found for foo"; exit 1; }
echo "Successfully installed grpcio-1.66 numpy-2.0"
PIP
chmod +x "$3/bin/pip"
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def make_venv(where: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "venv", f"PY={where / 'python'}"],
        cwd=where, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip


def test_the_install_shows_each_step_and_each_package(checkout: Path) -> None:
    p = make_venv(checkout)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        "make: [1/3] creating the virtualenv .venv",
        "make: [2/3] upgrading pip",
        "make: [3/3] installing camelot and its dependencies (about a minute, once)",
        "  Collecting grpcio>=1.60 (from camelot==0.1.0)",
        "  Collecting numpy",
        "  Successfully installed grpcio-1.66 numpy-2.0",
    ]
    assert (checkout / ".venv" / ".installed").exists()
    assert "Downloading" in (checkout / ".venv" / "install.log").read_text()


def test_a_failed_install_names_pips_log_and_is_not_marked_done(checkout: Path) -> None:
    p = make_venv(checkout, FAIL="1")
    assert p.returncode != 0
    assert p.stdout.splitlines()[-2:] == [
        "  ERROR: No matching distribution found for foo",
        "make: the install failed; pip's output is in .venv/install.log",
    ]
    assert not (checkout / ".venv" / ".installed").exists()
