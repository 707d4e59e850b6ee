"""Training classifiers: architectures (``models``), losses, batch transforms and methods, the
configuration (``config``), optimisers and schedules (``optim``), the CSM sampler (``sampler``), the
run folder (``runs``), inference (``inference``) and the loop (``trainer``)."""
