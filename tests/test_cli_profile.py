"""`camelot profile` hands its arguments to the profiler (services/profiler), which parses its own
flags; its user errors come out as the other commands' do: one line, exit 1."""

from __future__ import annotations

import pytest

from services import cli


def test_camelot_profile_help_is_the_profilers(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["profile", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--cuda-graphs" in out and "--shares" in out


def test_camelot_profile_of_an_unknown_pipeline_is_one_line_and_exit_1(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["profile", "no-such-pipeline", "--out", "/nonexistent/x.json"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-pipeline" in err[0]


def test_camelot_profile_of_a_missing_config_path_is_one_line_and_exit_1(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["profile", str(tmp_path / "mine.yaml")])
    assert e.value.code == 1
    assert "does not exist" in capsys.readouterr().err
