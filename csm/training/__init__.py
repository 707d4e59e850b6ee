"""Training classifiers: architectures (``models``), losses, batch transforms and methods (with
their hyper-parameter declarations and stage plans), the configuration (``config``), optimisers
and schedules (``optim``), the CSM sampler (``sampler``), each process's rows of a global batch
(``sharding``), the run folder and checkpoints (``runs``), inference (``inference``) and the loop
on accelerate (``trainer``)."""
