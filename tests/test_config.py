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
