"""Typed config: strict keys, typed overrides, round trip through JSON."""

import pytest

from uda.config import (
    AdaptConfig,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)


def test_overrides_are_typed():
    cfg = apply_overrides(
        ExperimentConfig(),
        [
            "train.iterations=10",
            "model.exchange_scales=1,2",
            "loss.weights=semseg:50,depth:1",
            "data.size=64,128",
            "model.weights_path=none",
            "model.self_attention=false",
        ],
    )
    assert cfg.train.iterations == 10
    assert cfg.model.exchange_scales == (1, 2)
    assert cfg.loss.weights == {"semseg": 50.0, "depth": 1.0}
    assert cfg.data.size == (64, 128)
    assert cfg.model.weights_path is None
    assert cfg.model.self_attention is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.iteration=3", "did you mean train.iterations"),
        ("model.arch=foo", "model.arch: 'foo' is not one of"),
        ("train.iterations=x", "train.iterations: expected int"),
        ("train.iterations=1.5", "train.iterations: expected int"),
        ("data.size=1,2,3", "data.size: expected 2 values"),
        ("target.size=32,64", "target is not used by this recipe"),
        ("iterations", "not of the form section.key=value"),
        ("tasks=semseg,colour", "'colour' is not one of"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(ExperimentConfig(), [override])


def test_round_trip(tmp_path):
    cfg = ExperimentConfig(target=DataConfig(dataset="cityscapes"), adapt=AdaptConfig(lambda_adv=0.01))
    save_config(cfg, tmp_path / "c.json")
    assert load_config(ExperimentConfig, tmp_path / "c.json") == cfg
    data = to_dict(cfg)
    data["train"]["warmup"] = 3
    with pytest.raises(ConfigError, match="unknown config key train.warmup"):
        from_dict(ExperimentConfig, data)


def test_a_config_of_the_previous_version_loads_with_bn_mode_moved(tmp_path):
    data = to_dict(ExperimentConfig(adapt=AdaptConfig()))
    data["train"].pop("bn_mode")
    data["adapt"]["bn_mode"] = "joint"  # where runs before the objectives refactor saved it
    path = tmp_path / "config.json"
    path.write_text(__import__("json").dumps(data))
    cfg = load_config(ExperimentConfig, path)
    assert cfg.train.bn_mode == "joint" and not hasattr(cfg.adapt, "bn_mode")


def test_the_old_spelling_of_a_moved_key_names_the_new_one():
    with pytest.raises(ConfigError, match=r"adapt.bn_mode \(it moved: use train.bn_mode\)"):
        apply_overrides(ExperimentConfig(adapt=AdaptConfig()), ["adapt.bn_mode=joint"])
