"""Config: validation, unknown keys, --set overrides."""

from __future__ import annotations

import pytest
import yaml

from mfsim.pipeline.config import DEFAULT_CONFIG, Config, load_config
from mfsim.pipeline.errors import MfsimError


def test_default_yaml_documents_every_key():
    """conf/default.yaml lists exactly the keys of the typed config, with the same defaults."""
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert Config.model_validate(data).resolved() == Config().resolved()
    text = DEFAULT_CONFIG.read_text()

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                yield from walk(v, prefix + k + ".")
            else:
                yield prefix + k

    for key in walk(Config().resolved()):
        leaf = key.split(".")[-1]
        line = next((ln for ln in text.splitlines() if ln.strip().startswith(leaf + ":")), None)
        assert line is not None and "#" in line, f"{key} is not documented with a comment in default.yaml"
    assert "lambda" in text and "scalings" in text


def test_overrides_are_yaml():
    cfg = load_config(None, ["svd.rank=32", "objectives.eq1.scalings=[symmetric,eq2_like]",
                             "objectives.eq1.lambda=2.5", "neighbours.users=[a, 7]"])
    assert cfg.svd.rank == 32
    assert cfg.objectives.eq1.scalings == ["symmetric", "eq2_like"]
    assert cfg.objectives.eq1.lambda_ == 2.5
    assert cfg.neighbours.users == ["a", 7]
    assert cfg.resolved()["objectives"]["eq1"]["lambda"] == 2.5


def test_unknown_key_names_the_key_and_valid_ones():
    with pytest.raises(MfsimError) as e:
        load_config(None, ["svd.rnak=3"])
    msg = str(e.value)
    assert "svd.rnak" in msg and "rank" in msg and "oversample" in msg
    with pytest.raises(MfsimError, match=r"unknown config key 'bogus'.*svd"):
        load_config(None, ["bogus.x=1"])


@pytest.mark.parametrize("override, pattern", [
    ("svd.rank=0", r"svd\.rank"),
    ("objectives.eq1.scalings=[symmetric,nope]", r"unknown eq1 scaling 'nope'.*eq2_like"),
    ("neighbours.item_item=[cosine,jaccard]", r"unknown metric 'jaccard'"),
    ("ingest.on_invalid=skip", r"ingest\.on_invalid"),
    ("svd.rank", r"dotted\.key=value"),
    ("svd.rank=[1", r"not valid YAML"),
])
def test_bad_values(override, pattern):
    with pytest.raises(MfsimError, match=pattern):
        load_config(None, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(MfsimError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
