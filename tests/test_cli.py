from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from csm import __version__
from csm.cli import COMMANDS, build_parser, main


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in {n.split()[0] for n in COMMANDS}:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_and_flags_from_its_config(name, capsys):
    parser = build_parser(only=name)
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*name.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert COMMANDS[name].help.split()[0] in out and "--config" in out


def test_data_info_digits(capsys):
    assert main(["data", "info", "digits"]) == 0
    out = capsys.readouterr().out
    assert "classes: 10" in out and "1x16x16 uint8" in out
    assert "train 1293, val 145, test 359 (total 1797" in out


def test_data_info_overrides_and_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("image_size: 8\nseed: 3\n")
    assert main(["data", "info", "digits", "--config", str(cfg), "--image-size", "12"]) == 0
    out = capsys.readouterr().out
    assert "1x12x12" in out and "split seed 3" in out


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "csm", *args], capture_output=True, text=True, timeout=120
    )


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    import datasets

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (6, 6), dtype=np.uint8)) for _ in range(4)]
    datasets.Dataset.from_dict(
        {"image": imgs, "y": [0, 1, 0, 1]},
        features=datasets.Features({"image": datasets.Image(), "y": datasets.Value("int64")}),
    ).save_to_disk(tmp_path / "ds")
    cases = [
        (["data", "info", "nope-not-a-dataset"], "cannot be loaded"),
        (["data", "info", str(tmp_path / "ds")], "no label column"),
        (
            ["data", "info", str(tmp_path / "ds"), "--label-column", "y", "--image-column", "y"],
            "is not images",
        ),
        (["data", "info", "digits", "--image-size", "big"], "--image-size"),
        (["data", "info", "digits", "--val-fraction", "1.5"], "--val-fraction"),
        (["data", "info", "digits", "--bogus", "1"], "unrecognized arguments"),
    ]
    # one case through a real process (exit status, no traceback on stderr) ...
    r = _run(*cases[0][0])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [ln for ln in r.stderr.splitlines() if "error" in ln] == [
        ln for ln in r.stderr.splitlines() if cases[0][1] in ln
    ]
    # ... and every case through the same entry point in this process (fast)
    for args, needle in cases:
        assert _main_exit(args) == 2, args
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if "error" in ln]
        assert len(lines) == 1 and needle in lines[0], (args, err)
        assert "Traceback" not in err


def _main_exit(args: list[str]) -> int:
    """Exit status of ``csm ARGS`` run in-process (argparse errors raise SystemExit)."""
    try:
        return main(args)
    except SystemExit as exc:
        return int(exc.code)
