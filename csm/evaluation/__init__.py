"""Evaluation of trained runs: ``evaluate`` (config and orchestration of ``csm evaluate``),
``outputs`` (runs, data and cached inference), ``cache`` (the safetensors output cache),
``scoring`` (calibrators and metrics per run), ``leaderboard`` (``results.csv`` and
``leaderboard.md``) and ``plots``."""
