"""Defaults live in the schema only (workflow/schemas/config.schema.yaml): no module of the package
(or of bench/) re-defaults a config key. Pure static analysis (the AST of every module, the text of the rules).

Flagged, for a key ``k`` that the schema gives a default (at any depth):

* ``x.get("k", <literal>)`` / ``x.setdefault("k", <literal>)``: a second default beside the schema's;
* ``x.get("k") or <literal>``: the same, spelled with ``or``;
* ``getattr(x, "k", <literal>)``: a config value read off an object (e.g. ``args``) with a default;
* a module-level constant named like such a key (``BUCKET_POOL`` beside ``train.bucket_pool``): a second
  home for that default, unless its value is the key's schema ``enum`` (the choices, not a default:
  ``SPLIT_BY = ("auto", "clip", "speaker")``);
* a parameter named like such a key with a ``<literal>`` default, positional or keyword-only, of a
  ``def``, ``async def`` or ``lambda`` (``def generate_codes(..., temperature=0.7)``): callers that omit
  it silently get a copy of the schema's value. Make it required and pass ``cfg[...]``; a parameter
  defaulting to ``None``, or without a default, is not flagged;
* an annotated field named like such a key with a ``<literal>`` value in a ``@dataclass`` class
  (``text_weight: float = 1.0``): the same, for the generated ``__init__``.

``<literal>``: a constant other than ``None`` (``x.get("k") or None`` only turns "" into None), a container
of constants or an UPPER_CASE name (a module constant). A default computed from something else
(``getattr(codec, "device", at_cfg["device"])``) is not a second default.
Non-config dicts that happen to use a key name (rows, records, JSON state), and generic helpers whose
parameter only shares a key's name, go in :data:`ALLOWED`, each with why (renaming the parameter is
often clearer).
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "workflow" / "higgs_tune"
RULES = ROOT / "workflow" / "rules"
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"

#: (file relative to the repo root, key) -> why that use is not a config read. Keep it short.
ALLOWED: dict[tuple[str, str], str] = {}


@functools.lru_cache(maxsize=1)
def schema_keys() -> tuple[dict[str, list[str]], dict[str, list]]:
    """``(names with a default -> their dotted schema paths, name -> the enums its properties have)``."""
    defaulted: dict[str, list[str]] = {}
    enums: dict[str, list] = {}

    def walk(node: dict, path: tuple[str, ...]) -> None:
        for key, sub in (node.get("properties") or {}).items():
            if not isinstance(sub, dict):
                continue
            if "default" in sub:
                defaulted.setdefault(key, []).append(".".join(path + (key,)))
            if "enum" in sub:
                enums.setdefault(key, []).append(sub["enum"])
            walk(sub, path + (key,))

    walk(yaml.safe_load(SCHEMA.read_text()), ())
    return defaulted, enums


def _literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value is not None
    if isinstance(node, ast.UnaryOp):
        return _literal(node.operand)
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return all(_literal(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _literal(k) and _literal(v) for k, v in zip(node.keys, node.values))
    if isinstance(node, ast.Name):
        return node.id.isupper()
    if isinstance(node, ast.Attribute):
        return node.attr.isupper()
    return False


def _get_key(node: ast.AST, methods=("get", "setdefault")) -> str | None:
    """``"k"`` of a call ``x.get("k", ...)`` (or ``setdefault``), else None."""
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in methods
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return node.args[0].value
    return None


def _param_defaults(fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda,
                    every: dict[str, list[str]]) -> list[tuple[int, str, str]]:
    """``(line, key, code)`` of each parameter of ``fn`` (positional-or-keyword or keyword-only) named like
    a defaulted schema key whose default is a literal."""
    a = fn.args
    positional = a.posonlyargs + a.args
    pairs = list(zip(positional[len(positional) - len(a.defaults):], a.defaults))
    pairs += [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
    name = "lambda" if isinstance(fn, ast.Lambda) else fn.name
    return [(arg.lineno, arg.arg, f"{name}({arg.arg}={ast.unparse(d)}) (a keyword default)")
            for arg, d in pairs if arg.arg in every and _literal(d)]


def _is_dataclass(cls: ast.ClassDef) -> bool:
    """``@dataclass``, ``@dataclass(...)``, ``@dataclasses.dataclass(...)``."""
    for d in cls.decorator_list:
        d = d.func if isinstance(d, ast.Call) else d
        if (isinstance(d, ast.Name) and d.id == "dataclass") or (
                isinstance(d, ast.Attribute) and d.attr == "dataclass"):
            return True
    return False


def redefaults(source: str, where: str) -> list[str]:
    """Every re-default of a schema key in Python ``source`` (see the module docstring), as
    ``"where:line: code -> schema path(s)"``."""
    every, enums = schema_keys()
    found: list[tuple[int, str, str]] = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call):
            k = _get_key(node)
            if k in every and len(node.args) >= 2 and _literal(node.args[1]):
                key = k
            elif (isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) == 3
                  and isinstance(node.args[1], ast.Constant) and node.args[1].value in every
                  and _literal(node.args[2])):
                key = node.args[1].value
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            k = _get_key(node.values[0], ("get",))
            if k in every and all(_literal(v) for v in node.values[1:]):
                key = k
        if key is not None:
            found.append((node.lineno, key, ast.unparse(node)))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            found += _param_defaults(node, every)
        elif isinstance(node, ast.ClassDef) and _is_dataclass(node):
            for stmt in node.body:  # annotated fields: `name: type = <literal>`
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and stmt.target.id in every and stmt.value is not None and _literal(stmt.value)):
                    found.append((stmt.lineno, stmt.target.id,
                                  f"{node.name}.{ast.unparse(stmt)} (a dataclass field default)"))
    for node in tree.body:  # module-level constants named like a defaulted key
        targets = [] if not isinstance(node, (ast.Assign, ast.AnnAssign)) else \
            node.targets if isinstance(node, ast.Assign) else [node.target]
        for t in targets:
            if isinstance(t, ast.Name) and t.id.isupper() and t.id.lower() in every:
                try:
                    value = ast.literal_eval(node.value) if node.value is not None else None
                except ValueError:
                    value = None
                if isinstance(value, (list, tuple)) and list(value) in enums.get(t.id.lower(), []):
                    continue  # the key's choices, not its default
                found.append((node.lineno, t.id.lower(), f"{t.id} = ... (a constant beside the schema default)"))
    return [f"{where}:{line}: {code} -> {', '.join(every[key])}" for line, key, code in sorted(found)
            if (where, key) not in ALLOWED]


def rule_redefaults(text: str, where: str) -> list[str]:
    """The rules (Snakemake syntax, not plain Python): ``.get("k", <anything>)`` of a schema key."""
    every, _ = schema_keys()
    out = []
    for m in re.finditer(r"""\.(?:get|setdefault)\(\s*["']([A-Za-z_]+)["']\s*,""", text):
        if m.group(1) in every and (where, m.group(1)) not in ALLOWED:
            line = text.count("\n", 0, m.start()) + 1
            out.append(f"{where}:{line}: {m.group(0)} -> {', '.join(every[m.group(1)])}")
    return out


def test_no_module_re_defaults_a_schema_key():
    found = []
    for f in sorted(PKG.rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py")):  # the benches read configs too
        found += redefaults(f.read_text(), f.relative_to(ROOT).as_posix())
    for f in sorted(RULES.glob("*.smk")) + [ROOT / "Snakefile"]:
        found += rule_redefaults(f.read_text(), f.relative_to(ROOT).as_posix())
    assert not found, ("config keys re-defaulted in code (defaults live in the schema: read the validated "
                       "config, cfg[key]):\n" + "\n".join(found))


def test_the_check_flags_re_defaults_and_passes_records():
    """The check can fail: each spelling of a re-default is flagged with its schema path; the same
    calls on keys the schema gives no default, on a key's enum, or with a computed default, are not;
    parameters and dataclass fields without a default, defaulting to None or to a computed value, or
    outside a dataclass, are not either."""
    snippet = '\n'.join([
        'BUCKET_POOL = 64',
        'SPLIT_BY = ("auto", "clip", "speaker")  # data.split_by\'s enum',
        'def f(data, args, row, codec, at_cfg):',
        '    a = float(data.get("min_duration_s", 0.3))',
        '    b = data.get("val_fraction") or 0.1',
        '    c = getattr(args, "num_workers", 0)',
        '    d = data.setdefault("split_seed", 0)',
        '    e = row.get("line", 0), row.get("warnings", []), getattr(codec, "device", at_cfg["device"])',
        '    g = row.get("language") or None, data.get("manifest", "m.jsonl")  # no default in the schema',
        '    return data["max_duration_s"]',
        'def g(x, temperature=0.7, /, top_p=0.95, *, packing=BASE, seed=None, level, device_map="auto"):',
        '    return x',
        'h = lambda batch, device="cpu": batch',
        'async def k(rows, split_by="auto", language=row_language(rows)):',
        '    return rows',
        '@dataclasses.dataclass(frozen=True)',
        'class Opts:',
        '    text_weight: float = 1.0',
        '    audio_weight: float = None',
        '    seed: int',
        'class Plain:',
        '    top_p: float = 0.95  # not a dataclass',
    ])
    found = redefaults(snippet, "x.py")
    assert len(found) == 11, found
    assert found[0] == "x.py:1: BUCKET_POOL = ... (a constant beside the schema default) -> train.bucket_pool"
    assert found[1].startswith("x.py:4: data.get('min_duration_s', 0.3) -> data.min_duration_s")
    assert "x.py:5: data.get('val_fraction') or 0.1 -> data.val_fraction" in found
    assert "x.py:6: getattr(args, 'num_workers', 0) -> audio_tokenizer.num_workers" in found
    assert "x.py:7: data.setdefault('split_seed', 0) -> data.split_seed" in found
    assert "x.py:11: g(temperature=0.7) (a keyword default) -> eval.generate.temperature" in found  # positional-only
    assert "x.py:11: g(top_p=0.95) (a keyword default) -> eval.generate.top_p" in found
    assert "x.py:11: g(packing=BASE) (a keyword default) -> train.packing" in found  # keyword-only, a constant
    assert "x.py:13: lambda(device='cpu') (a keyword default) -> audio_tokenizer.device, model.device" in found
    assert "x.py:14: k(split_by='auto') (a keyword default) -> data.split_by" in found
    assert "x.py:18: Opts.text_weight: float = 1.0 (a dataclass field default) -> train.text_weight" in found
    assert rule_redefaults('x = config["data"].get("min_duration_s", 0.3)\ny = res.get("gres", "")', "r.smk") == [
        'r.smk:1: .get("min_duration_s", -> data.min_duration_s']
