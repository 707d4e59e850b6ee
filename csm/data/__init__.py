"""Real data: loading and splitting datasets (``real``), training augmentation (``augment``) and
the corruptions of the shifted test sets (``corruptions``)."""
