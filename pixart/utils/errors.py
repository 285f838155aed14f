"""User-facing errors and the command-line wrapper that prints them as one line."""
import sys


class PixArtError(Exception):
    """An error caused by the user's input (a path, a flag, a file's contents).

    Command-line entry points print it as a single line and exit non-zero instead of
    showing a traceback, so the message itself must say what to do.
    """

    exit_code = 2


class CheckpointError(PixArtError):
    """A weights file is missing, unreadable, unsafe or does not fit the model."""


class ConfigError(PixArtError):
    """A configuration file or command-line option is invalid."""


def run_cli(main, argv=None):
    """Run `main(argv)` and turn a PixArtError into `error: <message>` and its exit code."""
    try:
        return main(argv)
    except PixArtError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
