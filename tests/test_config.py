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


# ----------------------------------------------------------------------------- typed configs and shared options


def _defaults(parser):
    return {a.dest: a.default for a in parser._actions if a.dest not in ("help", "config")}


def test_typed_configs_have_the_command_line_defaults():
    """The dataclass defaults are the options' defaults, so a config built in Python and one built
    from an empty command line are the same."""
    import dataclasses

    from pixart.cli import sample_parser, train_parser
    from pixart.pipelines.config import PipelineConfig
    from pixart.train.config import TrainConfig

    for cls, parser in ((PipelineConfig, sample_parser()), (TrainConfig, train_parser())):
        defaults = _defaults(parser)
        fields = [f for f in dataclasses.fields(cls) if f.name in defaults]
        assert len(fields) >= (20 if cls is PipelineConfig else 60)
        assert {f.name: getattr(cls(), f.name) for f in fields} == {f.name: defaults[f.name] for f in fields}
    assert {f.name for f in dataclasses.fields(TrainConfig)} == set(_defaults(train_parser()))


def test_shared_options_are_one_declaration():
    """An option that sample.py, demo.py, train.py and the feature tool share behaves the same in each."""
    from demo import build_parser as demo_parser
    from pixart.cli import extract_features_parser, sample_parser, train_parser

    parsers = {"sample": sample_parser(), "demo": demo_parser(), "train": train_parser(),
               "extract": extract_features_parser()}
    actions = {name: {a.dest: a for a in p._actions} for name, p in parsers.items()}
    # Same name, deliberately different meaning or default (documented in each --help).
    differ = {"batch_size", "dtype", "output_path", "sampling_steps", "seed", "config", "help",
              "max_steps",  # train: optimizer steps; demo: the largest step count a request may ask
              "controlnet"}  # train: optional value (alone: a new ControlNet); sample/demo: the weights to load
    shared = 0
    for dest in set().union(*actions.values()) - differ:
        owners = [a[dest] for a in actions.values() if dest in a]
        for action in owners[1:]:
            assert (action.type, action.choices, action.default, action.nargs) == \
                   (owners[0].type, owners[0].choices, owners[0].default, owners[0].nargs), dest
        shared += len(owners) > 1
    assert shared >= 20


def test_feature_tool_ignores_the_training_batch_size(tmp_path):
    from pixart.cli import extract_features_parser

    cfg = tmp_path / "train.yaml"
    cfg.write_text("batch_size: 32\nimage_size: 512\nstart_learning_rate: 2.0e-5\n")
    args = parse_args_with_config(extract_features_parser(), ["-c", str(cfg)], ignore_unknown=True)
    assert args.image_size == 512 and not hasattr(args, "batch_size")  # each image / caption is encoded alone


def test_pixart_config_presets_and_dict_round_trip():
    from pixart.models.pixart import PixArtConfig, build_pixart

    xl = PixArtConfig.preset("XL-2", input_size=64)
    assert (xl.depth, xl.hidden_size, xl.num_heads, xl.patch_size, xl.input_size) == (28, 1152, 16, 2, 64)
    tiny = PixArtConfig.preset("tiny")
    model = build_pixart(tiny.to_dict(), initialize=False)
    assert model.config == tiny and len(model.blocks) == tiny.depth
    assert PixArtConfig.from_dict(model.config.to_dict()) == tiny
    assert tuple(model.blocks[0].mlp.fc1.weight.shape) == (4 * tiny.hidden_size, tiny.hidden_size)
    with pytest.raises(ConfigError, match="unknown PixArt preset"):
        PixArtConfig.preset("XXL")
    with pytest.raises(ConfigError, match="unknown PixArt config keys: depthh"):
        PixArtConfig.from_dict({"depthh": 3})
