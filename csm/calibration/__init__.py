"""Calibration primitives: every metric the project reports (``metrics``) and the post-hoc
calibrators (``calibrators``). Training, annotation and evaluation all build on them."""
