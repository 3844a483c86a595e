"""Config: validation, unknown keys, --set overrides."""

from __future__ import annotations

import datetime as dt

import pytest
import yaml
from pydantic import BaseModel

from mfsim.pipeline.config import DEFAULT_CONFIG, Config, load_config, validate_config
from mfsim.pipeline.errors import MfsimError


def _sections(model: type[BaseModel], prefix: str = ""):
    """Every nested section model of the typed config with its dotted name (null-by-default ones too)."""
    for name, info in model.model_fields.items():
        for ann in (info.annotation, *getattr(info.annotation, "__args__", ())):
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield prefix + (info.alias or name), ann
                yield from _sections(ann, prefix + (info.alias or name) + ".")


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
    # the keys of a section that is null by default (cluster.tls) are documented in comments below it
    for section, model in _sections(Config):
        for name, info in model.model_fields.items():
            assert f" {info.alias or name}:" in text, f"{section}.{info.alias or name} is not documented"
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


@pytest.mark.parametrize("override, key", [
    ("svd.rank=true", "svd.rank"),            # a bool is not the integer 1
    ("svd.rank=2.5", "svd.rank"),             # nor is a float an integer
    ("cluster.processes=1", "cluster.processes"),  # nor an integer a bool
    ("objectives.eq1.lambda=yes", "objectives.eq1.lambda"),
    ("evaluation.cutoffs=[10, true]", "evaluation.cutoffs.1"),
    ("svd.oversample='10'", "svd.oversample"),  # a quoted number is a string
])
def test_types_are_strict_and_errors_name_the_override(override, key):
    with pytest.raises(MfsimError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"invalid config key '{key}' in --set {override}: "), str(e.value)
    assert "default.yaml" not in str(e.value)


def test_numbers_and_dates_still_parse():
    cfg = load_config(None, ["objectives.eq1.lambda=3", "objectives.eq2.lambda=1e-3", "ingest.window_days=28",
                             "simulate.cluster_probs=[1, 0.5, 2, 1, 1]", "ingest.as_of=2024-01-02",
                             "simulate.start_date='2023-05-06'"])
    assert cfg.objectives.eq1.lambda_ == 3.0 and cfg.objectives.eq2.lambda_ == 0.001
    assert cfg.ingest.window_days == 28.0 and cfg.simulate.cluster_probs == [1.0, 0.5, 2.0, 1.0, 1.0]
    assert cfg.ingest.as_of == dt.datetime(2024, 1, 2) and cfg.simulate.start_date == dt.date(2023, 5, 6)
    assert load_config(None, ["ingest.as_of='2024-01-02T03:00:00Z'"]).ingest.as_of == dt.datetime(
        2024, 1, 2, 3, tzinfo=dt.timezone.utc)
    # a resolved config (dates as ISO strings, as in a manifest) validates back to the same config
    assert validate_config(cfg.resolved()).resolved() == cfg.resolved()


def test_errors_name_the_file_or_the_override(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("svd:\n  rank: true\n")
    with pytest.raises(MfsimError, match=rf"invalid config key 'svd\.rank' in {p}: "):
        load_config(p)
    with pytest.raises(MfsimError, match=r"invalid config key 'svd\.rank' in --set svd\.rank=false"):
        load_config(p, ["svd.rank=false"])
    assert load_config(p, ["svd.rank=3"]).svd.rank == 3  # the override replaces the bad value
    with pytest.raises(MfsimError, match=r"unknown config key 'svd\.rnak' in --set svd\.rnak=3;"):
        load_config(p, ["svd.rank=3", "svd.rnak=3"])
    with pytest.raises(MfsimError, match=r"invalid config key 'svd\.rank' in --set svd=\{rank: true\}"):
        load_config(None, ["svd.rank=3", "svd={rank: true}"])  # the later override set the section
    # a check across a section's keys names the file and the override that took part
    with pytest.raises(MfsimError, match=r"'run' in .*default\.yaml and --set run\.heartbeat_s=200: "
                                         r"run\.lost_after_s \(120\) must exceed run\.heartbeat_s \(200\)"):
        load_config(None, ["run.heartbeat_s=200"])


def test_duplicate_keys_are_rejected_with_both_lines(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("svd:\n  rank: 8\n  seed: 1\n  rank: 16\nneighbours:\n  top_n: 5\n")
    with pytest.raises(MfsimError) as e:
        load_config(p)
    assert str(e.value) == f"config file {p}: key 'svd.rank' is given twice (line 2 and line 4); keep one of them"
    p.write_text("svd:\n  rank: 8\nsvd:\n  seed: 1\n")
    with pytest.raises(MfsimError, match=r"key 'svd' is given twice \(line 1 and line 3\)"):
        load_config(p)
    with pytest.raises(MfsimError, match=r"--set svd: .*key 'rank' is given twice"):
        load_config(None, ["svd={rank: 1, rank: 2}"])


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['touch {marker}']",
                                 "!!python/object:os.PathLike {{}}", "!!python/name:os.system"])
def test_python_tags_are_refused_by_the_safe_loader(tmp_path, tag):
    marker = tmp_path / "marker"
    p = tmp_path / "evil.yaml"
    p.write_text("run:\n  output: runs\nsvd:\n  rank: " + tag.format(marker=marker) + "\n")
    with pytest.raises(MfsimError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"config file {p}: line 4: the tag '!!python/") and "safe YAML loader" in msg, msg
    assert "\n" not in msg and not marker.exists()


def test_unreadable_config_files(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("svd:\n  rank: 8  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(MfsimError) as e:
        load_config(p)
    assert str(e.value) == f"config file {p} is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"
    with pytest.raises(MfsimError, match=rf"config file {tmp_path} is a directory; pass a YAML file"):
        load_config(tmp_path)
    p = tmp_path / "bad.yaml"
    p.write_text("svd:\n  rank: [1\n  seed: 2\n")
    with pytest.raises(MfsimError, match=rf"config file {p} is not valid YAML: line \d+, column \d+: ") as e:
        load_config(p)
    assert "\n" not in str(e.value)


def test_run_and_tls_keys():
    cfg = load_config(None, ["run.keep_last=7", "run.heartbeat_s=2", "run.lost_after_s=30",
                             "cluster.tls={ca_file: ca.pem, cert_file: c.pem, key_file: c.key}"])
    assert (cfg.run.keep_last, cfg.run.heartbeat_s, cfg.run.lost_after_s) == (7, 2.0, 30.0)
    tls = cfg.cluster.tls
    assert (tls.ca_file, tls.cert_file, tls.key_file) == ("ca.pem", "c.pem", "c.key")
    default = Config()
    assert default.cluster.tls is None and default.run.keep_last is None
    assert (default.run.heartbeat_s, default.run.lost_after_s) == (10.0, 120.0)
    for bad, pattern in (("run.keep_last=0", r"run\.keep_last"), ("run.heartbeat_s=0", r"run\.heartbeat_s"),
                         ("run.lost_after_s=10", r"must exceed run\.heartbeat_s"),
                         ("cluster.tls={ca_file: 1}", r"cluster\.tls\.ca_file"),
                         ("cluster.tls={ca: x}",
                          r"unknown config key 'cluster\.tls\.ca'.*ca_file, cert_file, key_file"),
                         ("cluster.heartbeat_s=5", r"unknown config key 'cluster\.heartbeat_s'")):
        with pytest.raises(MfsimError, match=pattern):
            load_config(None, [bad])


def test_sample_sizes_and_user_user_defaults():
    """audit.max_items and evaluation.max_users: integers >= 1; user-user lists are off unless asked for."""
    default = load_config(None)
    assert (default.audit.max_items, default.evaluation.max_users) == (20_000, 50_000)
    assert default.neighbours.user_user == [] and Config().neighbours.user_user == []
    cfg = load_config(None, ["audit.max_items=7", "evaluation.max_users=1",
                             "neighbours.user_user=[cosine, projected_cosine]"])
    assert (cfg.audit.max_items, cfg.evaluation.max_users) == (7, 1)
    assert cfg.neighbours.user_user == ["cosine", "projected_cosine"]
    for bad in ("audit.max_items=0", "audit.max_items=true", "audit.max_items=2.5", "audit.max_items=null",
                "evaluation.max_users=0", "evaluation.max_users=-3", "evaluation.max_users='10'"):
        with pytest.raises(MfsimError) as e:
            load_config(None, [bad])
        msg = str(e.value)
        assert msg.startswith(f"invalid config key '{bad.split('=')[0]}' in --set {bad}: "), msg
        assert msg.count("invalid config key") == 1, msg


def test_eq1_scaling_lists_must_name_produced_scalings():
    """``neighbours.eq1_scalings``: none by default, ``all`` or names that ``objectives.eq1.scalings`` produces; any
    other name is one error naming both keys."""
    assert load_config(None, []).list_scalings() == []
    cfg = load_config(None, ["objectives.eq1.scalings=[symmetric,eq2_like]", "neighbours.eq1_scalings=all"])
    assert cfg.list_scalings() == ["symmetric", "eq2_like"]
    cfg = load_config(None, ["objectives.eq1.scalings=[symmetric,eq2_like]", "neighbours.eq1_scalings=[eq2_like]"])
    assert cfg.list_scalings() == ["eq2_like"]
    with pytest.raises(MfsimError, match=r"neighbours.eq1_scalings names item_orthonormal, which "
                                         r"objectives.eq1.scalings does not produce \(symmetric, eq2_like\)"):
        load_config(None, ["objectives.eq1.scalings=[symmetric,eq2_like]",
                           "neighbours.eq1_scalings=[item_orthonormal]"])
    with pytest.raises(MfsimError, match=r"neighbours.eq1_scalings"):
        load_config(None, ["neighbours.eq1_scalings=[sideways]"])


def test_krylov_sizes_auto_scale_with_the_rank():
    """``svd.block_size`` / ``svd.max_blocks: auto``: 40 blocks of 16 at the default rank, room for 4 k columns and a
    block above it (65 x 16 at k = 256, where 40 x 16 stopped unconverged on binarized lastfm-hetrec2011), blocks of
    k / 16 above k = 256; numbers given are kept."""
    sizes = {k: (c.block_size, c.max_blocks) for k in (64, 256, 1000)
             for c in [load_config(None, [f"svd.rank={k}"]).svd]}
    assert sizes == {64: (16, 40), 256: (16, 65), 1000: (63, 65)}
    for k, (b, m) in sizes.items():
        assert b * m >= 4 * k + b
    given = load_config(None, ["svd.block_size=8", "svd.max_blocks=12"]).svd
    assert (given.block_size, given.max_blocks) == (8, 12)
