"""The stage command-line convention (higgs_tune.stage_cli): each path flag a rule renders is named
after that path's key in the rule, and the report's/comparison's ``--input ROLE=PATH`` reads back
exactly what the rule wrote."""

import re
import shlex
from pathlib import Path

import pytest

from higgs_tune import stage_cli

RULES = Path(__file__).resolve().parents[1] / "workflow" / "rules"


def test_every_rendered_path_flag_is_named_after_its_rule_key():
    pairs = []
    for smk in sorted(RULES.glob("*.smk")):
        text = smk.read_text()
        for flag, kind, key in re.findall(r"--([a-z][a-z-]*) \{(input|output|params)\.(\w+)(?::q)?\}", text):
            if key in ("cfg", "monitor", "nproc", "shard") or flag == "config-file":
                continue  # config JSON, values that are no paths, the launcher's accelerate --config-file
            pairs.append((smk.name, flag, kind, key))
    assert len(pairs) > 40, pairs  # every stage's rule: manifest ... export
    wrong = [p for p in pairs if p[1] != p[3].replace("_", "-")]
    assert not wrong, wrong


def test_input_roles_round_trip_the_rendered_flags(tmp_path):
    parser = stage_cli.stage_parser("x", "x", outputs={"html": "out"})
    stage_cli.add_input_roles(parser)
    roles = {"metrics": str(tmp_path / "a b" / "m.jsonl"), "odd": "x=y.json"}  # a space; '=' in the path
    rendered = " ".join(f"--input {shlex.quote(f'{r}={p}')}" for r, p in roles.items())  # common.smk role_args
    args = parser.parse_args(["--config-json", "{}", *shlex.split(rendered), "--html", "r.html"])
    assert stage_cli.input_roles(parser, args.input) == roles
    nested = stage_cli.input_roles(parser, ["demo-a:metrics=m1", "demo-b:metrics=m2", "demo-a:adapter=d"], nested=True)
    assert nested == {"demo-a": {"metrics": "m1", "adapter": "d"}, "demo-b": {"metrics": "m2"}}


@pytest.mark.parametrize("values, nested", [(["metrics"], False), (["=p"], False), (["a=1", "a=2"], False),
                                            (["metrics=p"], True)])
def test_input_roles_refuses_malformed_values(values, nested, capsys):
    parser = stage_cli.stage_parser("x", "x")
    with pytest.raises(SystemExit):
        stage_cli.input_roles(parser, values, nested=nested)
    assert "--input" in capsys.readouterr().err
