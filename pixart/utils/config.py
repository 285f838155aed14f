"""The one config parser: YAML files give defaults, the command line overrides them.

Every entry point (sample.py, train.py, demo.py) declares its options once with argparse; a YAML
file passed with ``-c`` may set any of those options by their long name. A YAML key that is not an
option is an error that names it, so a typo never passes silently.
"""
import argparse
import dataclasses
import difflib
import logging
import os
import sys

import yaml

from pixart.utils.errors import ConfigError

logger = logging.getLogger(__name__)


def str2bool(value):
    """argparse type for ``--flag True|False`` (the form PixArt's MindSpore commands use, e.g. --use_parallel True)."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <what> (see --help)`` and exit code 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def load_yaml(path):
    """Read a YAML mapping; a missing or malformed file is a ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist (see configs/ for the shipped ones)")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return data


def parse_args_with_config(parser, argv=None, config_flag="config", ignore_unknown=False):
    """Parse ``argv`` with YAML defaults from ``-c/--config``; unknown YAML keys raise ConfigError.

    YAML values are checked with each option's own type and choices, like command-line values.
    ``ignore_unknown`` lets a tool read a config written for another entry point (e.g. feature
    extraction reading a training config): foreign keys are skipped, near-misses of its own
    options still warned about.
    """
    args = parser.parse_args(argv)
    path = getattr(args, config_flag, None)
    if not path:
        return args
    values = load_yaml(path)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", config_flag)}
    ours = {}
    for key, value in values.items():
        if key in actions:
            ours[key] = _check_value(actions[key], key, value, path)
            continue
        if ignore_unknown:
            near = difflib.get_close_matches(key, actions, n=1, cutoff=0.85)
            if near:
                logger.warning("ignoring %r in %s (did you mean %s?)", key, path, near[0])
            continue
        near = closest_option(key, actions)
        hint = f" (did you mean {near}?)" if near else ""
        raise ConfigError(f"unknown key {key!r} in {path}{hint}")
    parser.set_defaults(**ours)
    return parser.parse_args(argv)


def closest_option(key, names):
    """The option a mistyped ``key`` most likely meant, or None.

    Candidates are difflib's close matches; the best is the one sharing the most characters with
    the key, ties going to the option declared first (the main one: ``learning_rat`` ->
    ``start_learning_rate``, not ``min_learning_rate``, which difflib's ratio prefers for being
    shorter).
    """
    names = list(names)
    near = difflib.get_close_matches(key, names, n=5)
    if not near:
        return None

    def shared(name):
        return sum(block.size for block in difflib.SequenceMatcher(None, key, name).get_matching_blocks())

    return max(near, key=lambda name: (shared(name), -names.index(name)))


def _check_value(action, key, value, path):
    if value is None:
        return None
    try:
        if action.type is not None and not isinstance(value, (list, dict)):
            value = action.type(value) if not isinstance(value, bool) or action.type is str2bool else value
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"{key} in {path}: {err}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{key} in {path} must be one of {list(action.choices)}, got {value!r}")
    return value


def config_from_args(cls, args, **changes):
    """A dataclass config from an argparse namespace: every field the namespace has, by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return cls(**{**values, **changes})
