"""Bad-input corpus (issue 18): every case must exit 2 with one line and change no file.

Runs ``csm.cli.main`` in-process on each case (offline), captures stderr, and hashes the work
folder before and after. Usage:
``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python eval/bad_inputs.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from csm.cli import main  # noqa: E402
from tests.helpers import make_run  # noqa: E402


def hashes(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def cases(w: Path) -> list[list[str]]:
    run, user, f = str(w / "run"), str(w / "user"), str(w / "file.txt")
    out: list[list[str]] = []
    for bad in ("nan", "inf", "-1", "0"):
        out += [["train", "--lr", bad, "--out", str(w / "t")]]
        out += [["fit-diffusion", "--dataset", "digits", "--lr", bad, "--out", str(w / "d")]]
        out += [
            [
                "generate",
                "--model",
                run,
                "--guidance",
                bad if bad != "0" else "-2",
                "--out",
                str(w / "g"),
                "--groups",
                "1",
            ]
        ]
    for flag in ("--epochs", "--batch-size", "--checkpoint-every", "--syn-groups", "--max-steps"):
        out += [["train", flag, "0", "--out", str(w / "t")]]
    for flag in ("--momentum", "--lr-decay"):
        out += [["train", flag, "5", "--out", str(w / "t")]]
    for target in (run, user, f):
        out += [["fit-diffusion", "--dataset", "digits", "--preset", "tiny", "--out", target]]
        out += [
            [
                "fit-diffusion",
                "--dataset",
                "digits",
                "--preset",
                "tiny",
                "--overwrite",
                "--out",
                target,
            ]
        ]
        out += [["generate", "--model", run, "--out", target, "--groups", "1"]]
        out += [["benchmark", "--out", target, "--methods", "ce", "--seeds", "1"]]
        out += [["demo", "--out", target]]
    out += [
        ["train", "--out", user],
        ["train", "--out", user, "--overwrite"],
        ["train", "--out", f],
    ]
    out += [["train", "--out", run, "--resume", "--overwrite"]]
    out += [["train", "--out", run], ["train", "--out", run, "--lr", "0.5", "--resume"]]
    for spec in (str(w / "missing"), f, str(w / "user")):
        out += [["data", "info", spec]]
        out += [["train", "--dataset", spec, "--out", run, "--overwrite"]]
        out += [["train", "--method", "csm", "--synthetic", spec, "--out", run, "--overwrite"]]
        out += [["annotate", spec, "--encoder", f"classifier:{run}", "--real", "digits"]]
        out += [["evaluate", run, "--out", str(w / "e"), "--ood", spec]]
        out += [["benchmark", "--dataset", spec, "--methods", "ce", "--out", str(w / "b")]]
    out += [["evaluate", run, "--out", run], ["evaluate", run, "--out", user]]
    out += [["evaluate", run, "--out", f], ["evaluate", str(w / "missing"), "--out", str(w / "e")]]
    for opt, val in (
        ("--calibrators", "nope"),
        ("--corruptions", "nope"),
        ("--n-bins", "0"),
        ("--severities", "9"),
    ):
        out += [["evaluate", run, "--out", str(w / "e"), opt, val]]
        out += [["benchmark", "--methods", "ce", "--seeds", "1", "--out", str(w / "b"), opt, val]]
    for opt, val in (
        ("--methods", "nope"),
        ("--group-size", "1"),
        ("--squash", "nan"),
        ("--squash", "-1"),
        ("--seeds", "0"),
        ("--groups", "0"),
        ("--preset", "x"),
    ):
        out += [["demo", "--out", str(w / "demo"), opt, val]]
    for opt, val in (
        ("--methods", "nope"),
        ("--seeds", "0"),
        ("--train-options", "lr"),
        ("--train-options", "out=x"),
        ("--methods", "csm"),
    ):
        out += [["benchmark", "--out", str(w / "b"), opt, val]]
    for opt, val in (
        ("--groups", "0"),
        ("--group-size", "1"),
        ("--steps", "0"),
        ("--scheduler", "x"),
        ("--mix-mode", "x"),
        ("--seed", "-1"),
    ):
        out += [["generate", "--model", run, "--out", str(w / "g"), "--groups", "1", opt, val]]
    for model in (str(w / "missing"), run, "nonexistent"):
        out += [["generate", "--model", model, "--out", str(w / "g"), "--groups", "1"]]
    for opt, val in (
        ("--method", "nope"),
        ("--model", "nope"),
        ("--optimizer", "x"),
        ("--schedule", "x"),
        ("--select-metric", "x"),
        ("--gamma", "2"),
        ("--model-options", "oops"),
        ("--method", "csm"),
    ):
        out += [["train", "--out", str(w / "t"), opt, val]]
    for opt, val in (
        ("--steps", "0"),
        ("--batch-size", "0"),
        ("--label-dropout", "1"),
        ("--ema-decay", "2"),
        ("--preset", "x"),
        ("--mixed-precision", "x"),
    ):
        out += [["fit-diffusion", "--dataset", "digits", "--out", str(w / "d"), opt, val]]
    out += [["annotate", str(w / "user"), "--encoder", f"classifier:{run}", "--squash", "nan"]]
    out += [["annotate", str(w / "user"), "--encoder", f"classifier:{run}", "--mode", "x"]]
    out += [["push", str(w / "user"), "--repo-id", "a/b"]]
    return out


def main_() -> int:
    logging.disable(logging.CRITICAL)
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        make_run(w / "run", [str(i) for i in range(10)])
        (w / "user").mkdir()
        (w / "user" / "thesis.tex").write_text("years of work")
        (w / "file.txt").write_text("a file")
        all_cases = cases(w)
        exit2 = one_line = unchanged = 0
        for argv in all_cases:
            before = hashes(w)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = main(argv)
                except SystemExit as exc:
                    code = exc.code
                except BaseException as exc:  # noqa: BLE001 - a traceback is a failure
                    code = f"traceback {type(exc).__name__}: {exc}"
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            same = hashes(w) == before
            exit2 += code == 2
            ok_line = (
                len(lines) >= 1
                and lines[-1].startswith("csm: error:")
                and not any("Traceback" in ln for ln in lines)
            )
            one_line += ok_line
            unchanged += same
            if code != 2 or not ok_line or not same:
                print(
                    f"FAIL {argv[:1]} {' '.join(argv[1:])[:100]}: code={code} same={same} "
                    f"last={lines[-1][:160] if lines else ''}"
                )
        print(
            f"cases {len(all_cases)}, exit 2: {exit2}, one line no traceback: {one_line}, "
            f"unchanged hashes: {unchanged}"
        )
        return 0 if exit2 == one_line == unchanged == len(all_cases) else 1


if __name__ == "__main__":
    raise SystemExit(main_())
