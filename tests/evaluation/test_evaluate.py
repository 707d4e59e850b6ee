"""Evaluator: leaderboard formatting by hand; end-to-end on tiny run directories."""

from __future__ import annotations

import math

import pytest

from csm.errors import CSMError
from csm.evaluation.leaderboard import format_leaderboard


def _row(method: str, seed: int, cal: str, cond: str, **metrics: float) -> dict:
    sev = int(cond.split("@")[1]) if "@" in cond else ""
    return {
        "run": f"runs/{method}-s{seed}",
        "method": method,
        "model": "cnn",
        "dataset": "digits",
        "seed": seed,
        "calibrator": cal,
        "condition": cond,
        "corruption": cond.split("@")[0] if "@" in cond else "",
        "severity": sev,
        "n": 100,
        **metrics,
    }


def _board_rows() -> list[dict]:
    rows = []
    ece = {("ce", 0): 0.10, ("ce", 1): 0.12, ("ls", 0): 0.05, ("ls", 1): 0.07}
    for (m, s), e in ece.items():
        rows.append(
            _row(
                m,
                s,
                "none",
                "clean",
                **{"cls/Acc": 0.9 + s * 0.01, "cal/ECE": e, "cls/NLL": 0.4 + e},
            )
        )
        rows.append(
            _row(
                m,
                s,
                "ts",
                "clean",
                **{"cls/Acc": 0.9 + s * 0.01, "cal/ECE": e / 2, "cls/NLL": 0.3 + e},
            )
        )
        for cal in ("none", "ts"):
            for corr, bump in (("blur", 0.1), ("contrast", 0.3)):
                rows.append(
                    _row(m, s, cal, f"{corr}@1", **{"cls/Acc": 0.8 - bump, "cal/ECE": e + bump})
                )
    return rows


def _cells(board: str, title_part: str, row_label: str) -> list[str]:
    lines = board.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("###") and title_part in line)
    for line in lines[start:]:
        if line.startswith(f"| {row_label} |"):
            return [c.strip() for c in line.strip("|").split("|")][1:]
    raise AssertionError(f"row {row_label} not in table {title_part}")


def test_leaderboard_mean_std_bold_and_header() -> None:
    board = format_leaderboard(_board_rows(), n_bins=15)
    assert "15 equal-width bins" in board and "x 100" in board and "nats" in board
    assert "2 seed(s) each" in board
    # clean, no calibrator: columns Acc, NLL, ECE (METRIC_INFO order)
    ce = _cells(board, "Clean test", "ce")
    ls = _cells(board, "Clean test", "ls")
    sd = math.sqrt(((0.10 - 0.11) ** 2 + (0.12 - 0.11) ** 2) / 1) * 100  # ddof=1
    assert ce[2] == f"11.00 ± {sd:.2f}"
    assert ls[2] == f"**6.00 ± {sd:.2f}**"  # lower ECE is better -> ls bold
    assert ce[0] == "**90.50 ± 0.71**" and ls[0] == "**90.50 ± 0.71**"  # tie: both bold
    assert ce[1] == "0.510 ± 0.014"  # NLL in nats, 3 decimals
    # post-hoc table: ts halves ECE
    assert _cells(board, "ECE on clean test", "ce") == [f"11.00 ± {sd:.2f}", f"5.50 ± {sd / 2:.2f}"]
    # shift table: mean over blur and contrast at severity 1 per run, then over seeds
    shift_ce = _cells(board, "Under shift", "ce")
    assert shift_ce[1] == "**60.00 ± 0.00**"  # Acc s1 = mean(0.7, 0.5); all equal: all bold
    assert shift_ce[0] == "**90.50 ± 0.71**"  # Acc clean
    shift_ls_ts = _cells(board, "Under shift", "ls + ts")
    assert shift_ls_ts[3] == f"**26.00 ± {sd:.2f}**"  # ECE s1 = 0.06 + 0.2 (ts rows hold e)


def test_leaderboard_reads_csv_strings_and_single_seed() -> None:
    rows = [
        {k: (str(v) if not isinstance(v, str) else v) for k, v in r.items()}
        for r in _board_rows()
        if r["seed"] == 0
    ]
    board = format_leaderboard(rows)
    assert _cells(board, "Clean test", "ce")[2] == "10.00"  # one seed: no ± part


def test_leaderboard_never_pools_different_datasets_as_seeds() -> None:
    rows = [r for r in _board_rows() if r["seed"] == 0]
    other = [{**r, "dataset": "mnist5k", "cal/ECE": 0.5} for r in rows]
    board = format_leaderboard(rows + other)
    assert _cells(board, "Clean test", "ce (digits)")[2] == "10.00"
    assert _cells(board, "Clean test", "ce (mnist5k)")[2] == "50.00"
    assert "Dataset: digits, mnist5k" in board


def test_leaderboard_empty() -> None:
    with pytest.raises(CSMError, match="no result rows"):
        format_leaderboard([])


# ---------------------------------------------------------------------------------------------
# end to end on tiny run directories built per the run-directory contract (csm.training.trainer
# format)

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from csm.config import load_config  # noqa: E402
from csm.evaluation.evaluate import EvaluateConfig, evaluate, evaluate_runs  # noqa: E402
from csm.evaluation.leaderboard import read_results  # noqa: E402
from tests.helpers import launch_two, make_run  # noqa: E402


def trained_run(
    root: Path,
    method: str = "ce",
    seed: int = 0,
    *,
    classes: list[int] | None = None,
    sharpen: float = 1.0,
    steps: int = 15,
    val_fraction: float = 0.1,
) -> Path:
    """A real (briefly trained) run directory in csm.training.trainer's format, on digits."""
    from csm.training.config import TrainConfig
    from csm.training.models import build_model_from_spec, model_spec
    from csm.training.runs import real_data_for

    d = root / f"{method}-s{seed}"
    cfg = TrainConfig(
        dataset="digits",
        method=method,
        seed=seed,
        data_seed=0,
        out=str(d),
        val_fraction=val_fraction,
        epochs=1,
    )
    data = real_data_for(cfg)
    keep = list(range(10)) if classes is None else classes
    names = [data.class_names[k] for k in keep]
    spec = model_spec("cnn", len(names), 1, 16, [0.3], [0.35], width=4)
    torch.manual_seed(seed)
    model = build_model_from_spec(spec)
    remap = torch.full((10,), -1, dtype=torch.int64)
    remap[torch.tensor(keep)] = torch.arange(len(keep))
    y_all = remap[data.train.labels]
    x, y = data.train.images[y_all >= 0].float() / 255.0, y_all[y_all >= 0]
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        for m in model.modules():  # exact BatchNorm statistics of the training images
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model(x)
        model.head.weight.mul_(sharpen)
        model.head.bias.mul_(sharpen)
    info = {"method": method, "model": "cnn", "dataset": "digits", "seed": seed}
    return make_run(d, names, model=model, spec=spec, cfg=cfg, info=info | {"status": "complete"})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "ce0": trained_run(root, "ce", 0, sharpen=4.0),
        "ce1": trained_run(root, "ce", 1, sharpen=4.0),
        "ls0": trained_run(root, "ls", 0),
    }


def _copy(run: Path, dst: Path) -> Path:
    return Path(shutil.copytree(run, dst / run.name, ignore=shutil.ignore_patterns("eval_cache")))


def test_evaluate_writes_everything_and_numbers_match_direct_computation(runs, tmp_path):
    from csm.calibration.metrics import compute_all
    from csm.data.corruptions import corrupt
    from csm.training.runs import load_run, real_data_for

    out = tmp_path / "eval"
    text = evaluate(
        EvaluateConfig(
            runs=[str(runs["ce0"]), str(runs["ce1"]), str(runs["ls0"])],
            out=str(out),
            calibrators=["ts"],
            corruptions=["blur"],
            severities=[3],
        )
    )
    assert "# Leaderboard" in text
    rows = read_results(out / "results.csv")
    # 3 runs x (none, ts) x (clean, blur@3)
    assert len(rows) == 3 * 2 * 2
    assert {r["condition"] for r in rows} == {"clean", "blur@3"}
    # recompute the uncalibrated clean and blur@3 metrics of ce seed 0 without the evaluator
    loaded = load_run(runs["ce0"])
    test = real_data_for(loaded.config).test
    x = test.images.float() / 255.0
    with torch.no_grad():
        clean = compute_all(loaded.model(x), test.labels)
        blurred = compute_all(loaded.model(corrupt(x, "blur", 3)), test.labels)
    row = next(
        r
        for r in rows
        if r["run"] == str(runs["ce0"]) and r["calibrator"] == "none" and r["condition"] == "clean"
    )
    for k in ("cls/Acc", "cls/NLL", "cal/ECE", "cal/smECE", "sc/AURC"):
        assert float(row[k]) == pytest.approx(clean[k], rel=1e-4, abs=1e-6), k
    # the bin-count sensitivity columns: the binned ECE at 5 ... 100 bins, clean test only
    from csm.calibration.metrics import ece

    with torch.no_grad():
        probs = loaded.model(x).softmax(-1)
    for b in (5, 25, 100):
        assert float(row[f"cal/ECE@{b}"]) == pytest.approx(ece(probs, test.labels, b), abs=1e-6)
    assert float(row["cal/ECE@15"]) == pytest.approx(float(row["cal/ECE"]), abs=1e-6)
    row = next(
        r
        for r in rows
        if r["run"] == str(runs["ce0"]) and r["calibrator"] == "none" and r["condition"] == "blur@3"
    )
    assert float(row["cls/Acc"]) == pytest.approx(blurred["cls/Acc"])
    assert row["corruption"] == "blur" and row["severity"] == "3" and row["n"] == "359"
    # paired against ce: ls seed 0 vs ce seed 0, the difference of the two results.csv values
    from csm.evaluation.leaderboard import read_paired

    paired = read_paired(out / "paired.csv")
    assert {(r["method"], r["calibrator"], r["seeds"]) for r in paired} == {
        ("ls", "none", "0"),
        ("ls", "ts", "0"),
    }
    clean = {
        (r["method"], r["calibrator"]): r
        for r in rows
        if r["condition"] == "clean" and r["seed"] == "0"
    }
    for r in paired:
        want = float(clean[("ls", r["calibrator"])].get(r["metric"])) - float(
            clean[("ce", r["calibrator"])].get(r["metric"])
        )
        tol = 1e-3 if r["metric"] == "cls/NLL" else 1e-5  # NLL from probabilities here
        assert r["mean_diff"] == pytest.approx(want, abs=tol), r["metric"]
    board = (out / "leaderboard.md").read_text()
    assert "## Paired against ce" in board and "Binned ECE vs number of bins" in board
    assert "## Sanity checks" in board and "145–145 images per run" in board
    # the sharpened (over-confident) runs: temperature scaling fitted on val lowers test ECE
    for run in ("ce0", "ce1"):
        ece = {
            r["calibrator"]: float(r["cal/ECE"])
            for r in rows
            if r["run"] == str(runs[run]) and r["condition"] == "clean"
        }
        assert ece["ts"] < ece["none"], ece
    board = (out / "leaderboard.md").read_text()
    assert board == text.split("\nwrote: ")[0]
    assert "| ce |" in board and "| ls |" in board and "1/2 seed(s)" in board
    import matplotlib.image as mpimg

    for name in ("reliability/ce.png", "reliability/ls.png", "risk_coverage.png"):
        assert mpimg.imread(out / name).shape[0] > 100
    cfg = load_config(EvaluateConfig, out / "config.yaml")
    assert cfg.calibrators == ["ts"] and cfg.severities == [3]
    assert not list(out.rglob("*.tmp"))


def test_cache_makes_reevaluation_instant_and_is_invalidated_by_new_weights(
    runs, tmp_path, monkeypatch
):
    import csm.evaluation.outputs as outputs_module
    import csm.evaluation.scoring as scoring_module

    run = _copy(runs["ls0"], tmp_path)
    cfg = EvaluateConfig(
        runs=[str(run)],
        out=str(tmp_path / "e"),
        calibrators=["ts"],
        corruptions=["gaussian_noise"],
        severities=[2],
    )
    first = evaluate_runs(cfg).rows
    names = sorted(p.name.split("-")[0] for p in (run / "eval_cache").rglob("*.st"))
    assert names == ["clean", "gaussian_noise@2", "scores", "val"]

    def no_inference(*a, **k):
        raise AssertionError("model was run although outputs are cached")

    def no_fit(*a, **k):
        raise AssertionError("calibrators refitted although scores are cached")

    monkeypatch.setattr(outputs_module, "predict", no_inference)
    monkeypatch.setattr(scoring_module, "fit_calibrators", no_fit)
    again = evaluate_runs(cfg).rows
    assert again == first  # identical, including the seeded noise condition
    # retrain = new weights: the cache must not be used, and the stale entries go away
    from safetensors.torch import load_file

    state = load_file(run / "model.safetensors")
    state["head.bias"] = state["head.bias"] + 1.0
    save_file(state, str(run / "model.safetensors"))
    with pytest.raises(AssertionError, match="cached"):
        evaluate_runs(cfg)
    monkeypatch.undo()
    changed = evaluate_runs(cfg).rows
    assert changed != first
    assert len(list((run / "eval_cache").iterdir())) == 1


def test_ood_heldout_classes_and_different_class_sets(tmp_path):
    from csm.calibration.calibrators import AlienHead
    from csm.calibration.metrics import selective_metrics

    sub = trained_run(tmp_path, "ce", 5, classes=[0, 1, 2, 3, 4], steps=4)
    rows = evaluate_runs(
        EvaluateConfig(
            runs=[str(sub)],
            out=str(tmp_path / "o"),
            calibrators=["ts", "alien"],
            corruptions=["none"],
            ood="heldout",
        )
    ).rows
    assert len(rows) == 3 and {r["condition"] for r in rows} == {"clean"}
    assert all(0.0 <= r["ood/AUROC"] <= 1.0 for r in rows)
    assert rows[0]["n"] < 359  # only the run's five classes are scored
    # alien keeps the softmax but ranks errors by -u: its sc/* come from the uncertainty
    cache = {p.name.split("-")[0]: p for p in (sub / "eval_cache").rglob("*.st")}
    assert set(cache) == {"val", "clean", "ood", "scores"}
    from safetensors.torch import load_file

    val, test = load_file(cache["val"]), load_file(cache["clean"])
    head = AlienHead().fit(val["logits"], val["labels"], val_features=val["features"])
    u = head.uncertainty(test["logits"], test["features"])
    expect = selective_metrics(-u, test["logits"].argmax(1) == test["labels"])
    by_cal = {r["calibrator"]: r for r in rows}
    for k, v in expect.items():
        assert by_cal["alien"][k] == pytest.approx(v), k
    assert by_cal["alien"]["cal/ECE"] == pytest.approx(by_cal["none"]["cal/ECE"], abs=1e-6)
    full = trained_run(tmp_path, "ls", 5, steps=1)
    with pytest.raises(CSMError, match="differ from") as err:
        evaluate_runs(
            EvaluateConfig(runs=[str(full), str(sub)], calibrators=["ts"], corruptions=["none"])
        )
    assert str(sub) in str(err.value)
    with pytest.raises(CSMError, match="--ood heldout: run .* every class"):
        evaluate_runs(
            EvaluateConfig(
                runs=[str(full)], calibrators=["ts"], corruptions=["none"], ood="heldout"
            )
        )


def test_bad_runs_give_one_clear_error(runs, tmp_path):
    run = _copy(runs["ls0"], tmp_path)
    (run / "model.safetensors").unlink()
    with pytest.raises(CSMError, match="no model.safetensors"):
        evaluate_runs(EvaluateConfig(runs=[str(run)], calibrators=["ts"], corruptions=["none"]))
    with pytest.raises(CSMError, match="not a directory"):
        evaluate_runs(EvaluateConfig(runs=[str(tmp_path / "nope")]))
    with pytest.raises(CSMError, match="no run directories"):
        evaluate_runs(EvaluateConfig(runs=[]))
    with pytest.raises(CSMError, match="--calibrators platt: unknown"):
        evaluate_runs(EvaluateConfig(runs=[str(runs["ls0"])], calibrators=["platt"]))
    with pytest.raises(CSMError, match="--corruptions fog: unknown"):
        evaluate_runs(EvaluateConfig(runs=[str(runs["ls0"])], corruptions=["fog"]))


def test_nan_logits_are_reported_with_count_and_place(runs, tmp_path):
    from safetensors.torch import load_file

    run = _copy(runs["ls0"], tmp_path)
    state = load_file(run / "model.safetensors")
    state["head.bias"][3] = float("nan")
    save_file(state, str(run / "model.safetensors"))
    with pytest.raises(CSMError) as err:
        evaluate_runs(EvaluateConfig(runs=[str(run)], calibrators=["ts"], corruptions=["none"]))
    msg = str(err.value)
    assert str(run) in msg and "val split" in msg and "class 3" in msg
    assert "145 non-finite logit(s)" in msg and "\n" not in msg


def test_empty_val_split(tmp_path):
    run = trained_run(tmp_path, "ce", 0, steps=1, val_fraction=0.001)
    with pytest.raises(CSMError, match="val split of dataset 'digits' is empty"):
        evaluate_runs(EvaluateConfig(runs=[str(run)], calibrators=["ts"], corruptions=["none"]))


def test_cli_evaluate(runs, tmp_path, capsys):
    from csm.cli import main

    out = tmp_path / "cli"
    code = main(
        [
            "evaluate",
            str(runs["ls0"]),
            "--out",
            str(out),
            "--calibrators",
            "ts",
            "--corruptions",
            "none",
            "--plots",
            "false",
        ]
    )
    assert code == 0
    assert "# Leaderboard" in capsys.readouterr().out
    assert (out / "results.csv").is_file() and not (out / "risk_coverage.png").exists()
    code = main(["evaluate", str(tmp_path / "missing"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("csm: error: run ") and "\n" not in err


def test_two_processes_split_inference_and_equal_one_process(runs, tmp_path, monkeypatch):
    """``accelerate launch --multi_gpu --num_processes 2 -m csm evaluate``: two gloo processes
    share the inference, only rank 0 writes, and every file equals a one-process run."""
    import json

    import csm.evaluation.outputs as outputs_module
    import csm.evaluation.scoring as scoring_module

    run = _copy(runs["ce0"], tmp_path)
    opts = ["--calibrators", "ts", "--corruptions", "none", "--batch-size", "32"]
    one, two = tmp_path / "one", tmp_path / "two"
    cfg = EvaluateConfig(
        runs=[str(run)],
        out=str(one),
        calibrators=["ts"],
        corruptions=["none"],
        batch_size=32,
        plots=False,
        cache=False,
    )
    evaluate(cfg)
    assert not (run / "eval_cache").exists()
    assert json.loads((one / "evaluation.json").read_text())["world_size"] == 1
    proc = launch_two(
        "-m", "csm", "evaluate", str(run), "--out", str(two), *opts, "--plots", "false",
        env={"CUDA_VISIBLE_DEVICES": ""}, timeout=600,
    )  # fmt: skip
    record = json.loads((two / "evaluation.json").read_text())
    assert record["world_size"] == 2 and record["ranks"] == [0, 1]  # both processes ran
    assert proc.stdout.count("# Leaderboard") == 1  # rank 1 printed nothing
    for name in ("results.csv", "leaderboard.md"):
        assert (two / name).read_text() == (one / name).read_text(), name
    assert not list(two.rglob("*.tmp*")) and not list(run.rglob("*.tmp*"))
    # rank 0 wrote the cache; a one-process evaluation reads it (no model, no fit): same rows
    names = sorted(p.name.split("-")[0] for p in (run / "eval_cache").rglob("*.st"))
    assert names == ["clean", "scores", "val"]
    expected = evaluate_runs(cfg).rows
    monkeypatch.setattr(outputs_module, "predict", lambda *a, **k: pytest.fail("inference"))
    monkeypatch.setattr(scoring_module, "fit_calibrators", lambda *a, **k: pytest.fail("fit"))
    again = evaluate_runs(EvaluateConfig(**{**vars(cfg), "cache": True})).rows
    assert again == expected
