"""Calibrated reannotation of synthetic images: image encoders (``encoders``) and the annotator
(``annotate``)."""
