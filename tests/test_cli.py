from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def _thp_probe(env: dict[str, str]) -> tuple[str, int]:
    """In a fresh process: run a csm command, then report the variable and the minor page
    faults of filling a new 40 MiB CPU tensor (10,240 with 4 KiB pages)."""
    code = (
        "import os, resource; from csm.cli import main; main(['data', 'info', 'digits']); "
        "import torch; t = torch.empty(10 * 2**20); "
        "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; t.fill_(1.0); "
        "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f; "
        "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), f)"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE",)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=base | env, capture_output=True, text=True, check=True
    )
    value, faults = out.stdout.split()[-2:]
    return value, int(faults)


def _thp_available() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.is_file() and "[never]" not in path.read_text()


def test_csm_commands_turn_on_pytorch_huge_page_cpu_allocations():
    value, faults = _thp_probe({})
    assert value == "1"
    if _thp_available():  # huge pages: a 40 MiB tensor takes ~20 faults of 2 MiB, not 10,240
        assert faults < 10240 // 4
    assert _thp_probe({"THP_MEM_ALLOC_ENABLE": "0"})[0] == "0"  # the user's value wins
    value, faults = _thp_probe({"CSM_CPU_HEAP_REUSE": "0"})  # opted out: 4 KiB pages
    assert value == "None" and faults >= 10240
