"""Semantic mixing with a class-conditional diffusion model: the mixing plan (``mixing``), the
diffusers pipeline (``pipeline``), training the generator (``fit``) and writing a synthetic dataset
(``generate``)."""
