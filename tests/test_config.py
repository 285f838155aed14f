"""The config parser: YAML sets defaults, the command line wins, unknown keys are named."""
import pytest

from pixart.utils.config import ArgumentParser, parse_args_with_config, str2bool
from pixart.utils.errors import ConfigError


def _parser():
    p = ArgumentParser(prog="x")
    p.add_argument("-c", "--config")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", choices=["dpm", "ddim"], default="dpm")
    p.add_argument("--use_parallel", type=str2bool, default=False)
    p.add_argument("--layers", type=int, nargs="*", default=None)
    return p


def test_yaml_sets_defaults_and_command_line_overrides(tmp_path):
    cfg = tmp_path / "a.yaml"
    cfg.write_text("steps: 7\nsampler: ddim\nuse_parallel: true\nlayers: [1, 2]\n")
    args = parse_args_with_config(_parser(), ["-c", str(cfg)])
    assert (args.steps, args.sampler, args.use_parallel, args.layers) == (7, "ddim", True, [1, 2])
    args = parse_args_with_config(_parser(), ["-c", str(cfg), "--steps", "3", "--use_parallel", "False"])
    assert (args.steps, args.use_parallel) == (3, False)


def test_unknown_or_bad_keys_are_named(tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text("stepz: 7\n")
    with pytest.raises(ConfigError, match=r"unknown key 'stepz' .*did you mean steps"):
        parse_args_with_config(_parser(), ["-c", str(cfg)])
    cfg.write_text("sampler: euler\n")
    with pytest.raises(ConfigError, match="sampler .* must be one of"):
        parse_args_with_config(_parser(), ["-c", str(cfg)])
    cfg.write_text("steps: many\n")
    with pytest.raises(ConfigError, match="steps in"):
        parse_args_with_config(_parser(), ["-c", str(cfg)])
    with pytest.raises(ConfigError, match="does not exist"):
        parse_args_with_config(_parser(), ["-c", str(tmp_path / "none.yaml")])


def test_command_line_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args_with_config(_parser(), ["--steps", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: argument --steps")


def test_ignore_unknown_reads_a_foreign_config(tmp_path, caplog):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("steps: 5\nlearning_rate: 0.1\nsamplr: ddim\n")
    args = parse_args_with_config(_parser(), ["-c", str(cfg)], ignore_unknown=True)
    assert args.steps == 5 and args.sampler == "dpm"
    assert "ignoring 'samplr'" in caplog.text and "learning_rate" not in caplog.text
