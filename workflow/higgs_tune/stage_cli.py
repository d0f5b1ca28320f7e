"""The stage command line: one convention for every stage the rules run.

Every stage module (``python -m higgs_tune.<stage>``) has ``main(argv=None)`` whose parser
:func:`stage_parser` builds:

* ``--<name> PATH`` for each path the rule renders, ``<name>`` being the key of that path in the
  rule's ``input:``/``output:`` (``_`` written ``-``: ``--val-metrics {output.val_metrics:q}``); a
  path a rule derives in ``params:`` (``evaluate_step``'s ``--adapter``, train's ``--resume-dir``)
  is named after its param the same way;
* ``--config-json JSON`` (the config sections the rule's ``params.cfg`` names) or, by hand,
  ``--configfile FILE`` (:func:`higgs_tune.config.add_config_args`);
* a module with more than one entry point takes them as ``argparse`` sub-commands
  (:func:`stage_subcommands`; ``python -m higgs_tune.audio_tokens encode|gather|decode``), each
  sub-command built the same way;
* a stage whose inputs are an open set of named roles (the report: every output upstream, some of
  them optional; the comparison: those of every run) takes them as a repeated
  ``--input ROLE=PATH`` (``--input EXPERIMENT:ROLE=PATH`` for the comparison), rendered by the rule
  from its named inputs (``role_args`` in ``workflow/rules/common.smk``) and read back with
  :func:`input_roles`: the role names stay the rule's input keys, and the parser need not list
  two dozen flags that the report's code already reads by role.

Flags that are not paths (``--threads``, ``--shard K``, ``--step N``) are added by the stage itself.
"""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from .config import add_config_args

#: one path flag: its help (a required path) or argparse keyword arguments (``help``, ``required``, ``nargs``...)
PathSpec = str | Mapping[str, Any]


def add_paths(parser: argparse.ArgumentParser, kind: str, paths: Mapping[str, PathSpec]) -> None:
    """Add ``--<name> PATH`` for each of ``paths`` (``name`` -> :data:`PathSpec`), dest ``name``.

    ``kind`` (``input`` / ``output``) opens each help text. A spec that is a string is a required
    path; a mapping is passed to ``add_argument`` (``required`` defaults to True).
    """
    for name, spec in paths.items():
        kw = {"help": spec} if isinstance(spec, str) else dict(spec)
        kw.setdefault("required", True)
        kw["help"] = f"{kind}: {kw.get('help', name)}"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, metavar=kw.pop("metavar", "PATH"), **kw)


def stage_parser(prog: str, description: str, *, inputs: Mapping[str, PathSpec] | None = None,
                 outputs: Mapping[str, PathSpec] | None = None, config: bool = True,
                 parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The parser of one stage (or one sub-command, given as ``parser``): config options unless
    ``config`` is False, then the ``inputs`` and ``outputs`` path flags (:func:`add_paths`)."""
    parser = parser or argparse.ArgumentParser(prog=prog, description=description)
    if config:
        add_config_args(parser)
    add_paths(parser, "input", inputs or {})
    add_paths(parser, "output", outputs or {})
    return parser


def stage_subcommands(prog: str, description: str):
    """A parser whose sub-commands are a module's entry points, and the function adding one.

    Returns:
        ``(parser, add)``; ``add(name, description, inputs=..., outputs=..., config=True)`` returns the
        sub-command's parser (:func:`stage_parser`). ``parser.parse_args`` sets ``command`` to the
        sub-command's name; a missing one is a usage error.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, **kw) -> argparse.ArgumentParser:
        return stage_parser(f"{prog} {name}", help_, parser=sub.add_parser(name, help=help_, description=help_), **kw)

    return parser, add


def add_input_roles(parser: argparse.ArgumentParser, what: str = "ROLE=PATH", help_: str | None = None) -> None:
    """The repeated ``--input ROLE=PATH`` flag (dest ``input``): named roles of an open set."""
    parser.add_argument("--input", action="append", default=[], metavar=what,
                        help=help_ or "input: one named input (the rule's input key) and its path; repeated")


def input_roles(parser: argparse.ArgumentParser, values: list[str], nested: bool = False) -> dict:
    """``--input`` values as ``{role: path}`` (``nested``: ``EXPERIMENT:ROLE=PATH`` as
    ``{experiment: {role: path}}``). The path is everything after the first ``=``.

    Raises:
        SystemExit: (``parser.error``) a value without ``=`` (or ``:``), an empty role, or a role given twice.
    """
    out: dict = {}
    for value in values:
        key, sep, path = value.partition("=")
        if nested:
            exp, colon, role = key.partition(":")
            if not colon:
                parser.error(f"--input {value!r}: expected EXPERIMENT:ROLE=PATH")
            into, key = out.setdefault(exp, {}), role
        else:
            into = out
        if not sep or not key:
            parser.error(f"--input {value!r}: expected {'EXPERIMENT:' if nested else ''}ROLE=PATH")
        if key in into:
            parser.error(f"--input: role {key!r} given twice")
        into[key] = path
    return out
