"""Plots: the drawn bars equal the statistics given, PNGs reload, risk-coverage by hand."""

from __future__ import annotations

import matplotlib.image as mpimg
import pytest
import torch

from csm.errors import CSMError
from csm.evaluation.plots import (
    ReliabilityPanel,
    bar_alphas,
    plot_reliability,
    plot_risk_coverage,
    reliability_figure,
    risk_coverage_curve,
)


def _panel(label: str = "none") -> ReliabilityPanel:
    edges = torch.linspace(0, 1, 5)
    return ReliabilityPanel(
        label=label,
        edges=edges,
        accuracy=torch.tensor([0.0, 0.3, 0.5, 0.9]),
        confidence=torch.tensor([0.1, 0.4, 0.6, 0.95]),
        count=torch.tensor([0, 10, 30, 60]),
        ece=0.0725,
    )


def test_reliability_bars_and_histogram_match_the_bins() -> None:
    fig = reliability_figure([_panel("none"), _panel("ts")], title="t")
    top, bottom = fig._csm_axes[0], fig._csm_axes[1]
    heights = [p.get_height() for p in top.patches[:4]]
    assert heights == pytest.approx([0.0, 0.3, 0.5, 0.9])  # empty bin drawn at 0
    gaps = [p.get_height() for p in top.patches[4:8]]
    assert gaps == pytest.approx([0.0, 0.1, 0.1, 0.05])
    shares = [p.get_height() for p in bottom.patches[:4]]
    assert shares == pytest.approx([0.0, 0.1, 0.3, 0.6])
    mean_acc = bottom.lines[0].get_xdata()[0]
    assert mean_acc == pytest.approx((0.3 * 10 + 0.5 * 30 + 0.9 * 60) / 100)
    assert "ECE 7.25%" in top.get_title()
    assert len(fig._csm_axes) == 4


def test_reliability_png_reloads(tmp_path) -> None:
    path = plot_reliability([_panel()], tmp_path / "sub" / "rel.png", title="x")
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert [p.name for p in path.parent.iterdir()] == ["rel.png"]  # no temp file left


def test_risk_coverage_by_hand() -> None:
    conf = torch.tensor([0.6, 0.9, 0.7, 0.8])
    correct = torch.tensor([0, 1, 1, 0])
    cov, risk = risk_coverage_curve(conf, correct)
    torch.testing.assert_close(cov, torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    # order 0.9 (ok), 0.8 (err), 0.7 (ok), 0.6 (err)
    torch.testing.assert_close(risk, torch.tensor([0.0, 0.5, 1 / 3, 0.5], dtype=torch.float64))


def test_risk_coverage_ties_are_stable() -> None:
    cov, risk = risk_coverage_curve(torch.tensor([0.5, 0.5]), torch.tensor([0, 1]))
    torch.testing.assert_close(risk, torch.tensor([1.0, 0.5], dtype=torch.float64))


def test_risk_coverage_png(tmp_path) -> None:
    curves = {"ce": risk_coverage_curve(torch.rand(50), torch.rand(50) > 0.3)}
    path = plot_risk_coverage(curves, tmp_path / "rc.png", title="test")
    assert mpimg.imread(path).shape[0] > 100


def test_empty_inputs_raise() -> None:
    with pytest.raises(CSMError, match="no panels"):
        reliability_figure([])
    with pytest.raises(CSMError, match="no curves"):
        plot_risk_coverage({}, "x.png")
    with pytest.raises(CSMError, match="no samples"):
        risk_coverage_curve(torch.empty(0), torch.empty(0))


def test_reliability_bars_fade_with_bin_mass_and_show_counts() -> None:
    top = reliability_figure([_panel()]).get_axes()[0]
    alphas = [p.get_facecolor()[3] for p in top.patches[:4]]  # counts 0, 10, 30, 60
    assert alphas == pytest.approx([0.2, 0.2 + 0.8 * 10 / 60, 0.2 + 0.8 * 30 / 60, 1.0])
    assert [t.get_text() for t in top.texts] == ["10", "30", "60"]  # no count on the empty bin
    assert bar_alphas(torch.tensor([0, 0])).tolist() == [0.2, 0.2]
