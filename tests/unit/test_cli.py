"""The command's error contract: bad input is one line and exit code 1; a bug keeps its traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from weighted_mtp import cli
from weighted_mtp.base.errors import MissingInputError, UserError
from weighted_mtp.base.io import StorageError
from weighted_mtp.config import ConfigError
from weighted_mtp.data.jsonl import JsonlError
from weighted_mtp.data.sampling import NotEnoughSamples
from weighted_mtp.models.checkpoints import CheckpointError
from weighted_mtp.storage.dataset_records import BadRecord

REPO = Path(__file__).resolve().parents[2]


def test_every_bad_input_error_is_a_user_error():
    for kind in (
        cli.UsageError,
        ConfigError,
        StorageError,
        JsonlError,
        CheckpointError,
        NotEnoughSamples,
        MissingInputError,
        BadRecord,
    ):
        assert issubclass(kind, UserError), kind
    assert issubclass(MissingInputError, FileNotFoundError)
    # a programming error is not one
    assert not issubclass(ValueError, UserError) and not issubclass(KeyError, UserError)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["storage", "datasets", "--datasets", "bogus"], "unknown dataset bogus"),
        (
            ["storage", "datasets", "--datasets", "codecontests", "--workers", "0"],
            "--workers must be at least 1, got 0",
        ),
        (["storage", "verify", "--check", "models", "--include-small"], "--include-small"),
        (["score", "--samples", "nope.jsonl", "--dataset", "humaneval"], "no such samples file"),
        (["report", "not-a-run"], "not a run folder"),
    ],
)
def test_bad_input_is_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*argv, "--storage", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("wmtp: error: ") and message in err and err.count("\n") == 1, err


def test_config_error_keeps_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  recipe: baseline\n  bacth_size: 3\n")
    assert cli.main(["train", str(bad), "--storage", str(tmp_path)]) == 1
    assert (
        capsys.readouterr().err == f"wmtp: error: {bad}:3: unknown config key 'train.bacth_size'\n"
    )


def test_an_unknown_recipe_is_one_line_naming_the_recipes_and_the_aliases(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  recipe: verifyable\n")
    assert cli.main(["train", str(bad), "--storage", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:2: config key 'train.recipe'" in err
    assert "choose from policy, critic, reference, pretrain (aliases: baseline, verifiable" in err


def test_train_help_lists_the_recipes_and_the_aliases(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for line in ("policy      the MTP policy", "reference   the reference LM's SFT",
                 "rho1        = policy with weighting rho1", "ntp         = policy on head 1 only",
                 "ref_tuning  = reference", "critic_td = verifiable"):  # fmt: skip
        assert line in out, line


def test_a_multi_line_user_error_is_printed_on_one_line(capsys):
    def handler(args):
        raise StorageError("first\nsecond")

    assert cli.dispatch(handler, None, "wmtp") == 1
    assert capsys.readouterr().err == "wmtp: error: first second\n"


@pytest.mark.parametrize("kind", [ValueError, KeyError, FileNotFoundError, RuntimeError])
def test_a_programming_error_propagates(kind):
    def handler(args):
        raise kind("a bug")

    with pytest.raises(kind, match="a bug"):
        cli.dispatch(handler, None, "wmtp")


def test_a_programming_error_shows_its_traceback(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    script = (
        "import sys\n"
        "from weighted_mtp import cli\n"
        "def broken(args):\n"
        "    return {}['missing']\n"
        "cli.HANDLERS[('report', None)] = broken\n"
        f"sys.exit(cli.main(['report', {str(run)!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "in broken" in result.stderr and "KeyError: 'missing'" in result.stderr
    assert "wmtp: error" not in result.stderr
