"""Evaluation of trained runs: scoring with every metric and calibrator (``evaluate``) and the
plots (``plots``)."""
