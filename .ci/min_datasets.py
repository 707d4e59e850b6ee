"""CI check: a csm synthetic dataset loads with the declared minimum of ``datasets``.

``write DIR`` writes a tiny dataset with csm; ``read DIR VERSION`` (run with only that datasets
release on the path, csm not needed) loads it with ``load_from_disk`` and ``load_dataset``.
"""

import sys


def write(path: str) -> None:
    import numpy as np

    from csm.synthetic import SyntheticWriter

    w = SyntheticWriter(path, ["a", "b"], {"group_size": 2, "dataset": "digits"}, 1, 2)
    for i in w.pending_shards():
        gid = np.repeat(list(w.shard_groups(i)), 2)
        n = len(gid)
        pixels = np.zeros((n, 1, 4, 4), np.uint8)
        w.write_shard(i, pixels, [0] * n, [1] * n, [0.0, 1.0] * (n // 2), gid, gid)
    w.finalize()


def read(path: str, version: str) -> None:
    import datasets

    assert datasets.__version__ == version, f"datasets {datasets.__version__} != {version}"
    for ds in (datasets.load_from_disk(path)["train"], datasets.load_dataset(path, split="train")):
        assert len(ds) == 4 and ds.features["soft_label"].length == 2, ds.features
        assert (
            ds[0]["soft_label"] == [0.0, 1.0]
            and ds[1]["soft_label"] == [1.0, 0.0]
            and ds.features["label"].names == ["a", "b"]
        )
    print(f"datasets {version} loads a csm dataset: ok")


if __name__ == "__main__":
    {"write": write, "read": read}[sys.argv[1]](*sys.argv[2:])
