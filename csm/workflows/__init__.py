"""Whole pipelines over the stages: ``benchmark`` (every method x seeds, then evaluation) and
``demo`` (the whole pipeline on an embedded dataset)."""
