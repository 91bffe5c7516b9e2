import pytest

from r1jax.config import Config, ConfigError, load_config, save_config


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_yaml_and_overrides_merge(tmp_path):
    path = _yaml(tmp_path, "grpo:\n  beta: 0.0\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["train.steps=9", "mesh.ici.fsdp=8", "model.path=/some/dir"])
    assert isinstance(cfg, Config)
    assert cfg.grpo.beta == 0.0
    assert cfg.train.steps == 9  # the command line wins over the file
    assert cfg.mesh.ici == {"fsdp": 8}
    assert cfg.model.path == "/some/dir"
    assert cfg.grpo.group_size == 16  # untouched default


def test_base_chain(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.5\n  steps: 3\n")
    path = _yaml(tmp_path, "base: base.yaml\ntrain:\n  steps: 4\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.steps) == (0.5, 4)


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["grpo.bta=0.1"])
    msg = str(e.value)
    assert "grpo.bta" in msg and "beta" in msg and "group_size" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="unknown config key 'model.hidden_sise'.*hidden_size"):
        load_config(_yaml(tmp_path, "model:\n  hidden_sise: 3\n"))
    with pytest.raises(ConfigError, match="unknown config key 'nosuch'.*grpo.*model"):
        load_config(None, ["nosuch=1"])


def test_wrong_type_names_key_expected_and_given(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_yaml(tmp_path, "train:\n  steps: many\n"))
    msg = str(e.value)
    assert "train.steps" in msg and "Integer" in msg and "str" in msg and "many" in msg
    with pytest.raises(ConfigError, match="grpo.beta.*Float.*str"):
        load_config(None, ["grpo.beta=abc"])


def test_missing_file_and_bad_override():
    with pytest.raises(ConfigError, match="config file not found: /no/such.yaml"):
        load_config("/no/such.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=5", "sampler.stop_strings=[</answer>]"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, str(out))
    again = load_config(str(out))
    assert again == cfg


def test_shipped_configs_load():
    import glob
    import os

    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    files = glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True)
    assert files, "configs/*.yaml missing"
    for f in files:
        load_config(f)


# ---------------------------------------------------------------------------------------------
# Valid values: a table generated from the schema, so a new field cannot skip its range
# ---------------------------------------------------------------------------------------------
import dataclasses  # noqa: E402
import math  # noqa: E402
import typing  # noqa: E402

import yaml  # noqa: E402

from r1jax import config as config_lib  # noqa: E402
from r1jax.config import Interval, Rule, spec_of, validate  # noqa: E402


def _leaf_type(tp):
    """(kind, container) of an annotation: kind a dataclass, int/float/str/bool or other;
    container None, list or dict."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return _leaf_type(rest[0]) if len(rest) == 1 else (object, None)
    if origin in (list, typing.List):
        return _leaf_type(args[0])[0], list
    if origin in (dict, typing.Dict):
        return _leaf_type(args[1])[0], dict
    return tp, None


def _schema_fields(cls, prefix=""):
    """Every leaf field under a config dataclass: (dotted path, owner class, field, kind,
    container); a path step of a list of dataclasses is written `name[0]`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, container = _leaf_type(hints[f.name])
        if dataclasses.is_dataclass(kind):
            step = f"{f.name}[0]" if container is list else f.name
            yield from _schema_fields(kind, f"{prefix}{step}.")
        else:
            yield f"{prefix}{f.name}", cls, f, kind, container


def _undeclared(cls):
    return [path for path, _, f, kind, _ in _schema_fields(cls)
            if kind in (int, float, str) and spec_of(f) is None]


def _invalid_values(spec, kind):
    """Values of the field's type that `spec` must reject: just past each interval end, NaN
    and infinities for floats, a string outside a set of choices."""
    if kind is str:
        return ["not-a-valid-choice"] if not any(isinstance(a, Rule) and a is config_lib.TEXT
                                                 for a in spec.alternatives) else []
    cands = [0, -1, 1, 10**9, -(10**9)]
    for a in spec.alternatives:
        if isinstance(a, Interval):
            for end in (a.lo, a.hi):
                if math.isfinite(end):
                    cands += [end, end - 1, end + 1, end - 0.5, end + 0.5]
    if kind is float:
        cands += [math.nan, math.inf, -math.inf]
    else:
        cands = [int(c) for c in cands if float(c).is_integer()]
    bad = sorted({c for c in cands if not spec.ok(kind(c))}, key=repr)
    return bad[:1] + bad[len(bad) // 2:][:1] + bad[1:][-1:] if len(bad) > 3 else bad


def _nested(path, value):
    """{"a": {"b": [{"c": value}]}} for "a.b[0].c"."""
    out = value
    for part in reversed(path.split(".")):
        if part.endswith("[0]"):
            out = {part[:-3]: [out]}
        else:
            out = {part: out}
    return out


CASES = [
    (path, value, container)
    for path, _, f, kind, container in _schema_fields(config_lib.Config)
    if spec_of(f) is not None
    for value in _invalid_values(spec_of(f), kind)
]


def test_every_numeric_and_text_field_declares_its_valid_values():
    missing = _undeclared(config_lib.Config)
    assert not missing, ("config fields without valid(default, spec) (see the block at the top "
                         f"of r1jax/config.py): {missing}")
    validate(config_lib.Config())  # every default is valid
    # Every declared numeric or choice spec rejects something (an interval such as
    # "(-inf, inf)" still rejects NaN and infinity).
    for path, _, f, kind, _ in _schema_fields(config_lib.Config):
        spec = spec_of(f)
        if spec is not None and spec.alternatives != [config_lib.TEXT]:
            assert _invalid_values(spec, kind), f"{path}: spec {spec.text} rejects nothing"


def test_a_field_without_a_declared_range_fails_the_coverage_check():
    @dataclasses.dataclass
    class Added:
        ok: int = config_lib.valid(1, "[1, inf)")
        forgot: float = 0.5
        flag: bool = True

    assert _undeclared(Added) == ["forgot"]


@pytest.mark.parametrize("path,value,container", CASES, ids=[f"{p}={v!r}" for p, v, _ in CASES])
def test_out_of_range_value_is_one_line_naming_key_value_and_range(tmp_path, path, value, container):
    leaf = [value] if container is list else {"x": value} if container is dict else value
    key = path.replace("[0]", "[0]") + ("[0]" if container is list else ".x" if container is dict else "")
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(_nested(path, leaf)))
    with pytest.raises(ConfigError) as e:
        load_config(str(file))
    msg = str(e.value)
    spec = next(spec_of(f) for p, _, f, _, _ in _schema_fields(config_lib.Config) if p == path)
    assert "\n" not in msg
    assert str(file) in msg and f"'{key}'" in msg and repr(value) in msg and spec.text in msg, msg


def test_override_is_named_as_the_origin_and_python_configs_are_checked_too():
    with pytest.raises(ConfigError, match=r"^override 'train.lr=-1': config key 'train.lr' must be in "
                                          r"\(0, inf\), got -1.0$"):
        load_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"override 'mesh.ici.fsdp=0'.*'mesh.ici.fsdp' must be one of -1, "
                                          r"\[1, inf\), got 0"):
        load_config(None, ["mesh.ici.fsdp=0"])
    cfg = Config()
    bad = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, scale_rewards="sometimes"))
    with pytest.raises(ConfigError, match="'grpo.scale_rewards' must be one of 'group', 'batch', 'none', "
                                          "got 'sometimes'"):
        validate(bad)
    with pytest.raises(ConfigError, match="'train.steps' must be in \\[0, inf\\), got str '5'"):
        validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps="5")))
    assert load_config(None, ["data.template=Question {prompt}"]).data.template == "Question {prompt}"
    with pytest.raises(ConfigError, match="from_dict.*'eval.top_p' must be in \\(0, 1\\], got 0.0"):
        config_lib.from_dict({"eval": {"top_p": 0.0}}, origin="from_dict")


def test_damaged_config_files_are_named(tmp_path):
    cases = {
        "garbage.yaml": b"train: [unclosed\n  steps: : 3\n",
        "list.yaml": b"- train\n- steps\n",
        "scalar.yaml": b"just a sentence\n",
        "empty.yaml": b"",
        "comments.yaml": b"# nothing but a comment\n",
        "binary.yaml": bytes(range(256)) * 4,
        "truncated.yaml": b"train:\n  steps: 3\ngrpo:\n  beta: 0.0\n  loss_agg: \"tok",
    }
    expect = {"garbage.yaml": "not valid YAML", "list.yaml": "must hold a mapping", "scalar.yaml": "must hold a mapping",
              "empty.yaml": "empty", "comments.yaml": "empty", "binary.yaml": "not",
              "truncated.yaml": "not valid YAML"}
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ConfigError) as e:
            load_config(str(p))
        msg = str(e.value)
        assert "\n" not in msg and str(p) in msg and expect[name] in msg, (name, msg)
    with pytest.raises(ConfigError, match=f"{tmp_path}: is a directory, not a config file"):
        load_config(str(tmp_path))
    (tmp_path / "loop.yaml").write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\ntrain:\n  steps: 1\n")
    with pytest.raises(ConfigError, match="loop.yaml: its `base:` chain includes itself"):
        load_config(str(tmp_path / "loop.yaml"))
    (tmp_path / "child.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: .*missing.yaml"):
        load_config(str(tmp_path / "child.yaml"))
