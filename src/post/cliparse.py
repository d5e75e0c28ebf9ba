"""The parser pieces every ``post`` command shares (the stage commands and the service's commands).

:class:`Parser` is jsonargparse's parser with help that spells flags with dashes;
:func:`config_parser` gives a command a flag (or ``--config`` YAML) for every field of its config
dataclass. Kept apart from :mod:`post.cli` so that :mod:`post.service.cli` can build its commands
without importing the command line that imports it.
"""

from __future__ import annotations

import re

from jsonargparse import ActionConfigFile, ArgumentParser

_SNAKE_FLAG = re.compile(r"--([a-z0-9]+(?:_[a-z0-9]+)+)")


class Parser(ArgumentParser):
    """jsonargparse parser whose help spells flags with dashes (both spellings are accepted)."""

    def format_help(self) -> str:
        return _SNAKE_FLAG.sub(lambda m: "--" + m.group(1).replace("_", "-"), super().format_help())

    def format_usage(self) -> str:
        return _SNAKE_FLAG.sub(lambda m: "--" + m.group(1).replace("_", "-"), super().format_usage())


def config_parser(config: type, description: str) -> ArgumentParser:
    """Flags (or ``--config`` YAML) for every field of a config dataclass."""
    p = Parser(description=(config.__doc__ or description).split("\n\n")[0], exit_on_error=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML file with options (flags override it).")
    p.add_class_arguments(config, nested_key=None, as_group=False, instantiate=False)
    return p
