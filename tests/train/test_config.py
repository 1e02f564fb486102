import dataclasses

import pytest

from calibft.config import build, field_help
from calibft.distributions import families
from calibft.splits import splits
from calibft.train.config import PRESETS, TrainConfig, load_config, preset_values


def build_config(values):
    return build(TrainConfig, values)


def test_defaults_follow_paper_soft_recipe():
    cfg = load_config()
    assert (cfg.method, cfg.decimals, cfg.max_bins, cfg.epochs, cfg.repeats) == (
        "soft",
        5,
        1001,
        3,
        1,
    )
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
    assert cfg.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_ratio, cfg.batch_size, cfg.max_seq_len) == (
        2e-4,
        0.01,
        0.03,
        8,
        256,
    )


def test_method_hard_selects_paper_hard_recipe():
    cfg = load_config(cli={"method": "hard"})
    assert (cfg.method, cfg.max_bins, cfg.repeats, cfg.epochs) == ("hard", 16384, 16, 2)
    assert load_config(overrides=["method=hard"]).max_bins == 16384


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_validate(name):
    cfg = load_config(preset=name)
    assert cfg.method == ("hard" if name == "paper-hard" else "soft")
    assert set(preset_values(name)) <= set(field_help(TrainConfig))


def test_quick_preset_is_smaller_than_paper():
    quick, paper = load_config(preset="quick"), load_config(preset="paper-soft")
    assert 0 < quick.prompts_per_family
    train_families = len(families("train"))
    grid = len(splits()["train"])
    assert quick.epochs * quick.prompts_per_family * train_families < paper.epochs * grid / 4


def test_precedence_preset_file_cli_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('epochs = 5\nlr = 1e-3\nlora_targets = ["q_proj"]\n')
    cfg = load_config(
        preset="quick",
        config_file=path,
        cli={"lr": 3e-4},
        overrides=["seed=7", "families=gaussian,beta"],
    )
    assert cfg.epochs == 5 and cfg.lr == 3e-4 and cfg.seed == 7
    assert cfg.lora_targets == ["q_proj"] and cfg.families == ["gaussian", "beta"]
    assert cfg.decimals == preset_values("quick")["decimals"]


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "a.yaml").write_text("batch_size: 4\ntoken_mean: true\nmethod: hard\n")
    assert load_config(config_file=tmp_path / "a.yaml").batch_size == 4
    (tmp_path / "b.json").write_text('{"batch_size": 2}')
    assert load_config(config_file=tmp_path / "b.json").batch_size == 2


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(preset="quick", overrides=["seed=3"])
    import json

    (tmp_path / "c.json").write_text(json.dumps(cfg.to_dict()))
    assert load_config(config_file=tmp_path / "c.json") == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=0", "lr must be > 0"),
        ("lr=-1e-4", "lr must be > 0"),
        ("batch_size=0", "batch_size must be an integer >= 1"),
        ("epochs=-1", "epochs must be an integer >= 1"),
        ("epochs=1.5", "expects int"),
        ("method=dpo", "method must be one of soft, hard"),
        ("nonsense=1", "unknown config key 'nonsense'"),
        ("warmup_ratio=1", r"warmup_ratio must be a number in \[0, 0.99\]"),
        ("token_mean=true", "token_mean applies to method 'hard'"),
        ("token_mean=maybe", "expects bool"),
        ("lora_targets=", "lora_targets must name"),
        ("epochs", "KEY=VALUE"),
        (
            "decimals=10",
            r"decimals must be an integer in \[0, 9\]",
        ),  # the Rust grid's limit, stated once
        ("max_bins=1", r"max_bins must be an integer in \[2, 1048576\]"),
        ("seed=-1", "seed must be an integer"),
    ],
)
def test_invalid_values_raise_value_error(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(overrides=[override])


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        load_config(preset="fast")
    with pytest.raises(ValueError, match="does not exist"):
        load_config(config_file=tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("epochs = [")
    with pytest.raises(ValueError, match="not valid"):
        load_config(config_file=tmp_path / "bad.toml")
    (tmp_path / "x.ini").write_text("")
    with pytest.raises(ValueError, match=r"\.toml, \.yaml"):
        load_config(config_file=tmp_path / "x.ini")


def test_every_field_has_help():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
    assert build_config({}) == TrainConfig()


def test_precision_auto_follows_the_device():
    cfg = load_config()
    assert (cfg.dtype, cfg.mixed_precision) == ("auto", "auto")
    assert (cfg.resolved_dtype(cuda=True), cfg.resolved_mixed_precision(cuda=True)) == (
        "bfloat16",
        "bf16",
    )
    assert (cfg.resolved_dtype(cuda=False), cfg.resolved_mixed_precision(cuda=False)) == (
        "float32",
        "no",
    )
    chosen = load_config(overrides=["dtype=float32", "mixed_precision=fp16"])
    assert (chosen.resolved_dtype(True), chosen.resolved_mixed_precision(True)) == (
        "float32",
        "fp16",
    )
    with pytest.raises(ValueError, match="dtype"):
        load_config(overrides=["dtype=int8"])
