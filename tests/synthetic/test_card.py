"""Tests for the dataset card: licence, provenance without paths, regeneration options."""

from __future__ import annotations

import numpy as np
import pytest
from huggingface_hub import DatasetCard

from csm.errors import CSMError
from csm.synthetic import SyntheticWriter
from csm.synthetic.card import (
    generation_options_from_card,
    public_ref,
    render_card,
    resolve_license,
)

INFO = {
    "model": "/home/alice/secret/runs/diffusion-digits",
    "model_sha256": "ab" * 32,
    "dataset": "digits",
    "groups": 3,
    "group_size": 2,
    "steps": 4,
    "guidance": 1.5,
    "seed": 7,
    "batch_size": 5,
    "scheduler": "ddim",
    "mix_mode": "embedding",
    "license": "other",
}


@pytest.fixture()
def dataset(tmp_path):
    w = SyntheticWriter(tmp_path / "syn", ["a", "b", "c"], INFO, 2, 3)
    for i in w.pending_shards():
        gid = np.repeat(list(w.shard_groups(i)), 2)
        n = len(gid)
        pixels = np.zeros((n, 1, 4, 4), dtype=np.uint8)
        w.write_shard(i, pixels, [0] * n, [1] * n, [0.0, 1.0] * (n // 2), gid, gid)
    w.finalize()
    return tmp_path / "syn"


def test_card_parses_carries_licence_and_hides_local_paths(dataset):
    text = (dataset / "README.md").read_text()
    card = DatasetCard.load(dataset / "README.md")
    assert card.data.license == "cc-by-4.0"  # digits: UCI's CC BY 4.0, from the known table
    assert card.data.source_datasets == [
        "extended|other-uci-optical-recognition-of-handwritten-digits"
    ]
    assert "/home/alice" not in text and "diffusion-digits" in text and "ab" * 32 in text
    assert "archive.ics.uci.edu/dataset/80" in text


def test_the_written_card_is_what_huggingface_hub_prints_for_it(dataset):
    """README.md is rendered without building a DatasetCard (two fewer YAML passes); it must be
    byte for byte the text the card class gives, so the Hub and ``DatasetCard.load`` agree."""
    from csm.synthetic import read_manifest
    from csm.synthetic.card import build_card

    text = (dataset / "README.md").read_text()
    assert str(DatasetCard(text)) == text
    files = ["train/x.arrow"]
    assert str(build_card(read_manifest(dataset), 6, files)) == render_card(
        read_manifest(dataset), 6, files
    )


def test_generation_options_from_card_rebuild_the_generate_call(dataset):
    opts = generation_options_from_card(dataset)
    assert opts == {
        "groups": 3,
        "group_size": 2,
        "steps": 4,
        "guidance": 1.5,
        "seed": 7,
        "batch_size": 5,
        "scheduler": "ddim",
        "mix_mode": "embedding",
        "model": "diffusion-digits",
        "model_sha256": "ab" * 32,
        "groups_per_shard": 2,
        "license": "cc-by-4.0",
    }
    assert generation_options_from_card(dataset / "README.md") == opts
    (dataset / "README.md").write_text("---\nlicense: mit\n---\nno csm block\n")
    with pytest.raises(CSMError, match="no complete csm generation record"):
        generation_options_from_card(dataset)
    with pytest.raises(CSMError, match="--from-card"):
        generation_options_from_card(dataset / "nowhere")


def test_public_ref_and_licence_resolution(tmp_path):
    assert public_ref("classifier:runs/ce-digits") == "classifier:ce-digits"
    assert public_ref("clip:openai/clip-vit-base-patch32") == "clip:openai/clip-vit-base-patch32"
    assert public_ref(str(tmp_path / "gen")) == "gen" and public_ref("mnist5k") == "mnist5k"
    assert resolve_license("mnist5k") == "mit" and resolve_license("digits") == "cc-by-4.0"
    assert resolve_license("my-folder", "apache-2.0") == "apache-2.0"
    with pytest.raises(CSMError, match="--license"):
        resolve_license(str(tmp_path))
