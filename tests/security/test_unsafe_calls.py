"""No call that executes code or builds arbitrary objects from data gets into the code base unreviewed.

Every tracked Python file is parsed (the AST, so aliases such as `from pickle import loads as l` and
`import yaml as y` are followed, and comments or strings do not count) for: `pickle`/`cPickle`/`dill`/
`marshal` loads, `pickle.Unpickler`, `shelve.open`, `eval`, `exec`, `yaml.load` without a safe loader,
`yaml.unsafe_load`/`full_load`, `torch.load` without `weights_only=True`, `numpy.load(allow_pickle=True)`.
A use must have a reviewed entry in `unsafe_allowlist.yaml` (file, call, reason); an entry whose use is
gone fails too, so the list never vouches for code that changed.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import yaml
from conftest import REPO

PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "marshal"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _python_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "*.py"], capture_output=True, text=True,
                                check=True).stdout.split()
        return [REPO / p for p in listed]
    except (OSError, subprocess.CalledProcessError):  # an export without .git: every file but outputs
        return [p for p in REPO.rglob("*.py") if not {".venv", "out", "data", "runs"} & set(p.relative_to(REPO).parts)]


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, call) for each unsafe use in a module's source."""
    tree = ast.parse(source)
    modules: dict[str, str] = {}  # local name -> module (import x as y)
    names: dict[str, str] = {}  # local name -> module.attr (from x import a as b)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules[alias.asname or alias.name.split(".")[0]] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def dotted(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return names.get(expr.id) or (modules.get(expr.id) if expr.id in modules else expr.id)
        if isinstance(expr, ast.Attribute):
            base = dotted(expr.value)
            return f"{base}.{expr.attr}" if base else None
        return None

    def keyword(call: ast.Call, name: str) -> ast.expr | None:
        return next((k.value for k in call.keywords if k.arg == name), None)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)) and not isinstance(getattr(node, "ctx", None), ast.Store):
            name = dotted(node)
            if name and name.split(".")[0] in PICKLERS and name.endswith(".Unpickler"):
                found.append((node.lineno, "pickle.Unpickler"))
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func) or ""
        head, _, attr = name.rpartition(".")
        if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            found.append((node.lineno, name.split(".")[-1]))
        elif head.split(".")[0] in PICKLERS and attr in ("load", "loads"):
            found.append((node.lineno, f"pickle.{attr}"))
        elif name == "shelve.open":
            found.append((node.lineno, name))
        elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            found.append((node.lineno, name))
        elif name in ("yaml.load", "yaml.load_all"):
            loader = keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if (dotted(loader) or "").split(".")[-1] not in SAFE_YAML_LOADERS:
                found.append((node.lineno, name))
        elif name == "torch.load":
            flag = keyword(node, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append((node.lineno, "torch.load"))
        elif name in ("numpy.load", "np.load"):
            flag = keyword(node, "allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                found.append((node.lineno, "numpy.load"))
    return sorted(set(found))


def test_the_detector_finds_each_unsafe_form():
    """One form per line: aliases followed, safe forms and look-alike methods left alone."""
    lines = [
        "import pickle as p, yaml, torch, numpy as np, dill",
        "from pickle import loads as l",
        "from yaml import load",
        "p.load(f)",                                  # 4
        "l(b)",                                       # 5
        "dill.loads(b)",                              # 6
        "eval('1')",                                  # 7
        "exec('x = 1')",                              # 8
        "yaml.load(s)",                               # 9
        "load(s, Loader=yaml.FullLoader)",            # 10
        "yaml.unsafe_load(s)",                        # 11
        "torch.load(f)",                              # 12
        "torch.load(f, weights_only=False)",          # 13
        "np.load(f, allow_pickle=True)",              # 14
        "class U(p.Unpickler): pass",                 # 15
        "yaml.load(s, Loader=yaml.SafeLoader); yaml.safe_load(s); torch.load(f, weights_only=True)",
        "np.load(f); model.eval(); obj.load(f); ast.literal_eval(s)",
    ]
    assert unsafe_calls("\n".join(lines)) == [
        (4, "pickle.load"), (5, "pickle.loads"), (6, "pickle.loads"), (7, "eval"), (8, "exec"), (9, "yaml.load"),
        (10, "yaml.load"), (11, "yaml.unsafe_load"), (12, "torch.load"), (13, "torch.load"), (14, "numpy.load"),
        (15, "pickle.Unpickler")]


def test_no_unreviewed_unsafe_call_in_the_code_base():
    allowed = {(e["file"], e["call"]): e for e in yaml.safe_load((Path(__file__).parent / "unsafe_allowlist.yaml").read_text())}
    for entry in allowed.values():
        assert entry.get("reason", "").strip(), f"allow-list entry {entry} has no reason"
    seen: set[tuple[str, str]] = set()
    unreviewed = []
    for path in _python_files():
        rel = path.relative_to(REPO).as_posix()
        for line, call in unsafe_calls(path.read_text()):
            if (rel, call) in allowed:
                seen.add((rel, call))
            else:
                unreviewed.append(f"{rel}:{line}: {call}")
    assert not unreviewed, ("unreviewed calls that run code or build objects from data (use a safe form, or add a "
                            "reviewed entry with its reason to tests/security/unsafe_allowlist.yaml):\n"
                            + "\n".join(unreviewed))
    stale = sorted(set(allowed) - seen)
    assert not stale, f"allow-list entries whose use is gone (remove them): {stale}"
