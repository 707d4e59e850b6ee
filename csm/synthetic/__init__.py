"""The synthetic dataset: a Hugging Face ``datasets`` folder of class-mixed images with a card.

Modules: :mod:`~csm.synthetic.schema` (columns, features, constants), :mod:`~csm.synthetic.storage`
(atomic files, manifest, shard records), :mod:`~csm.synthetic.writer` (the resumable writer),
:mod:`~csm.synthetic.card` (card and ``datasets`` metadata), :mod:`~csm.synthetic.variants`
(named label-only annotations over the same images), :mod:`~csm.synthetic.reader` (readers) and
:mod:`~csm.synthetic.hub` (``csm push``). The public API is importable from here::

    from csm.synthetic import SyntheticWriter, load_synthetic, load_synthetic_tensors
"""

from csm.synthetic.card import render_card, write_dataset_metadata
from csm.synthetic.reader import (
    SyntheticImages,
    SyntheticTensors,
    iter_shards,
    load_synthetic,
    load_synthetic_tensors,
)
from csm.synthetic.schema import (
    LABEL_COLUMNS,
    LAMBDA_NAME,
    MANIFEST_NAME,
    soft_targets,
    synthetic_features,
    to_uint8,
)
from csm.synthetic.storage import check_dataset, file_sha256, read_manifest, read_table
from csm.synthetic.variants import activate, annotation_names, parse_spec
from csm.synthetic.writer import SyntheticWriter

__all__ = [
    "LABEL_COLUMNS",
    "LAMBDA_NAME",
    "MANIFEST_NAME",
    "SyntheticImages",
    "SyntheticTensors",
    "SyntheticWriter",
    "activate",
    "annotation_names",
    "check_dataset",
    "file_sha256",
    "iter_shards",
    "load_synthetic",
    "load_synthetic_tensors",
    "parse_spec",
    "read_manifest",
    "read_table",
    "render_card",
    "soft_targets",
    "synthetic_features",
    "to_uint8",
    "write_dataset_metadata",
]
