from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from csm.config import load_config, resolve_config, save_config
from csm.errors import CSMError


@dataclass
class Cfg:
    steps: int = 25
    lr: float = 0.1
    name: str = "x"
    flag: bool = False
    maybe: int | None = None
    methods: list[str] = field(default_factory=lambda: ["ce"])


def test_layers_defaults_file_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 10\nlr: 0.5\nmethods: [ce, ls]\n")
    cfg = resolve_config(Cfg, f, {"lr": "0.25", "flag": "true", "maybe": "none"})
    assert cfg == Cfg(steps=10, lr=0.25, flag=True, maybe=None, methods=["ce", "ls"])
    cfg = resolve_config(Cfg, overrides={"methods": "ce,ls focal", "maybe": "3"})
    assert cfg.methods == ["ce", "ls", "focal"] and cfg.maybe == 3


def test_roundtrip(tmp_path):
    cfg = Cfg(steps=3, flag=True, methods=["a", "b"])
    path = save_config(cfg, tmp_path / "out")
    assert yaml.safe_load(path.read_text())["steps"] == 3
    assert load_config(Cfg, path) == cfg
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "config.yaml"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"stepz": 1}, "unknown option 'stepz'"),
        ({"steps": "ten"}, "--steps"),
        ({"steps": 2.5}, "--steps"),
        ({"flag": "maybe"}, "--flag"),
    ],
)
def test_bad_values_name_the_option(overrides, needle):
    with pytest.raises(CSMError, match=needle):
        resolve_config(Cfg, overrides=overrides)


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("steps: [1\n")
    with pytest.raises(CSMError, match="bad.yaml: invalid YAML"):
        resolve_config(Cfg, f)
    with pytest.raises(CSMError, match="file not found"):
        resolve_config(Cfg, tmp_path / "missing.yaml")
