"""Config resolution: defaults < preset < overrides < argv, type checks, helpful errors, round trip."""
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from nanoalign.config import ConfigError, TrainConfig, config_from_dict, config_to_dict, load_config


@dataclass
class FakeDPOConfig:
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0
    ref_free: bool = False
    max_prompt_len: int | None = None
    temperatures: list = field(default_factory=lambda: [1.0, 0.7])


@dataclass
class ClashingConfig:
    lr: float = 1.0  # already a TrainConfig key


@dataclass
class OptionalConfig:
    reward_model: Optional[str] = None


def registry(name):
    return {"dpo": FakeDPOConfig, "clash": ClashingConfig, "opt": OptionalConfig}.get(name)


def test_defaults_match_train_config():
    cfg = load_config([])
    assert cfg.algo == "dpo" and cfg.lr == TrainConfig.lr and cfg.max_steps == 200 and cfg.compile is False
    assert config_to_dict(cfg) == config_to_dict(TrainConfig())


def test_precedence_defaults_preset_overrides_argv(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('lr = 3e-4\nmax_steps = 50\nbatch_size = 16\nout_dir = "out/p"\n')
    cfg = load_config([str(preset), "--max_steps=7"], overrides={"max_steps": 9, "batch_size": 4})
    assert cfg.lr == 3e-4  # preset beats default
    assert cfg.batch_size == 4  # overrides beat preset
    assert cfg.max_steps == 7  # argv beats overrides
    assert cfg.out_dir == "out/p" and cfg.n_layer == 4  # untouched keys keep preset / default values


def test_argv_strings_are_converted():
    cfg = load_config(["--lr=1e-4", "--max_steps=12", "--compile", "--resume=No", "--device=cpu",
                       "--dtype=bfloat16", "--lora_alpha=8", "--max-len=64"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.max_steps == 12 and isinstance(cfg.max_steps, int)
    assert cfg.compile is True and cfg.resume is False
    assert cfg.device == "cpu" and cfg.dtype == "bfloat16"
    assert cfg.lora_alpha == 8.0 and isinstance(cfg.lora_alpha, float)  # int accepted for a float key
    assert cfg.max_len == 64  # dashes read as underscores


@pytest.mark.parametrize("text,expected", [("true", True), ("TRUE", True), ("1", True), ("yes", True),
                                           ("false", False), ("0", False), ("No", False)])
def test_bool_spellings(text, expected):
    assert load_config([f"--compile={text}"]).compile is expected


@pytest.mark.parametrize("arg,key,expected", [("--max_steps=1.5", "max_steps", "int"),
                                              ("--max_steps=abc", "max_steps", "int"),
                                              ("--lr=fast", "lr", "float"),
                                              ("--compile=maybe", "compile", "bool"),
                                              ("--dtype=float16", "dtype", "one of 'auto', 'float32', 'bfloat16'"),
                                              ("--lr", "lr", "float")])
def test_wrong_type_names_key_value_and_type(arg, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config([arg])
    message = str(e.value)
    assert repr(key) in message and expected in message and "command line" in message
    if "=" in arg:
        assert repr(arg.split("=", 1)[1]) in message  # the offending value is quoted


def test_wrong_type_in_preset_names_the_file(tmp_path):
    preset = tmp_path / "bad.toml"
    preset.write_text('max_steps = "many"\n')
    with pytest.raises(ConfigError, match=r"'max_steps'.*bad\.toml.*expected int.*'many'"):
        load_config([str(preset)])
    preset.write_text("compile = 1\n")  # TOML ints are not bools
    with pytest.raises(ConfigError, match="expected bool"):
        load_config([str(preset)])


def test_unknown_key_suggests_close_names():
    with pytest.raises(ConfigError) as e:
        load_config(["--learning_rate=1"])
    assert "'learning_rate'" in str(e.value) and "did you mean lr" in str(e.value)
    assert "command line" in str(e.value)
    with pytest.raises(ConfigError, match="did you mean max_steps"):
        load_config(["--max_step=3"])
    with pytest.raises(ConfigError, match="did you mean beta"):  # algorithm keys are suggested too
        load_config(["--betta=0.2"], registry)


def test_unknown_key_in_preset_says_which_file(tmp_path):
    preset = tmp_path / "typo.toml"
    preset.write_text("n_layers = 2\n")
    with pytest.raises(ConfigError, match=r"'n_layers'.*typo\.toml.*did you mean n_layer"):
        load_config([str(preset)])


def test_algorithm_keys_are_merged_and_typed():
    cfg = load_config(["--beta=0.5", "--loss_type=ipo", "--ref_free", "--max_prompt_len=32", "--lr=2e-5"], registry)
    assert (cfg.beta, cfg.loss_type, cfg.ref_free, cfg.max_prompt_len, cfg.lr) == (0.5, "ipo", True, 32, 2e-5)
    assert cfg.label_smoothing == 0.0 and cfg.temperatures == [1.0, 0.7]  # algorithm defaults
    assert type(cfg).__name__ == "Config"
    assert load_config(["--max_prompt_len=none"], registry).max_prompt_len is None
    with pytest.raises(ConfigError, match="unknown config key 'beta'"):  # another algorithm has no beta
        load_config(["--algo=sft", "--beta=0.5"], registry)


def test_algo_chosen_in_preset_selects_its_keys(tmp_path):
    preset = tmp_path / "opt.toml"
    preset.write_text('algo = "opt"\nreward_model = "ckpt:out/rm"\n')
    cfg = load_config([str(preset)], registry)
    assert cfg.algo == "opt" and cfg.reward_model == "ckpt:out/rm"
    assert load_config([str(preset), "--reward_model=None"], registry).reward_model is None


def test_key_in_both_dataclasses_is_an_error():
    with pytest.raises(ConfigError, match=r"ClashingConfig.*\['lr'\]"):
        load_config(["--algo=clash"], registry)


def test_bad_argv_shapes(tmp_path):
    with pytest.raises(ConfigError, match="unexpected argument"):
        load_config(["lr=1"])
    with pytest.raises(ConfigError, match="only one preset"):
        load_config(["a.toml", "b.toml"])
    with pytest.raises(ConfigError, match="not found"):
        load_config([str(tmp_path / "missing.toml")])
    nested = tmp_path / "nested.toml"
    nested.write_text("[model]\nn_layer = 2\n")
    with pytest.raises(ConfigError, match="flat table"):
        load_config([str(nested)])


def test_round_trip_through_dict():
    cfg = load_config(["--beta=0.3", "--max_prompt_len=16", "--compile", "--out_dir=out/x"], registry)
    saved = config_to_dict(cfg)
    assert saved["beta"] == 0.3 and saved["lr"] == TrainConfig.lr
    rebuilt = config_from_dict(saved, registry)
    assert rebuilt == cfg and config_to_dict(rebuilt) == saved
    with pytest.raises(ConfigError, match="saved config"):
        config_from_dict({**saved, "gone": 1}, registry)


def test_every_key_is_checked_against_its_declared_range_algorithm_keys_included():
    from nanoalign.algos import algo_config
    for argv, message in ((["--beta=-1"], "'beta' from the command line: -1.0 is not > 0"),
                          (["--max_steps=0"], "'max_steps' from the command line: 0 is not >= 1"),
                          (["--algo=grpo", "--samples_per_prompt=1"], "'samples_per_prompt' from the command line: 1 is not >= 2"),
                          (["--algo=ppo", "--gamma=2"], "'gamma' from the command line: 2.0 is not in [0, 1]"),
                          (["--algo=cdpo", "--label_smoothing=0.5"], "'label_smoothing' from the command line: 0.5 is not in [0, 0.5)"),
                          (["--dropout=1"], "'dropout' from the command line: 1.0 is not in [0, 1)")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(argv, algo_config)
    assert load_config(["--algo=ppo", "--gamma=1", "--lam=0"], algo_config).gamma == 1.0  # the bounds themselves
