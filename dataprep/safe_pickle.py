"""Read a data-only Python pickle (REFER's `refs(unc).p`) without ever running code from it.

`pickle.load` imports and calls whatever globals a pickle names (`os.system` via `__reduce__`), so
it must never see an untrusted file. `load_data_pickle` uses a `pickle.Unpickler` whose
`find_class` refuses EVERY global and whose `persistent_load` refuses every persistent id: without
a global there is no callable on the unpickler's stack, so REDUCE/NEWOBJ/BUILD cannot run anything,
and only the literal opcodes remain (dict, list, tuple, str, int, float, bool, None). The result
is then walked and anything else (bytes, sets from protocol 4+) is refused as well.

REFER's files were written by Python 2 (protocol 2; `str` as SHORT_BINSTRING/BINSTRING), so they
are read with `encoding="latin1"`: every Python 2 byte string becomes the `str` of the same
code points, as `refer.py` does under Python 3. Any refusal raises `InputError` naming the file and
the offending global.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from dataprep.quarantine import InputError
from dataprep.sources import read_annotation_file

_ALLOWED = (dict, list, tuple, str, int, float, bool, type(None))


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global (a class or a function): never imported, never called."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.module = module
        self.name = name


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # noqa: D102
        raise RefusedGlobal(module, name)

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102
        raise pickle.UnpicklingError(f"persistent id {str(pid)[:80]!r}")


def _check(obj: Any, where: str) -> None:
    """Iteratively verify the unpickled tree holds only plain data types."""
    stack: list[tuple[Any, str]] = [(obj, where)]
    while stack:
        value, path = stack.pop()
        if type(value) not in _ALLOWED:
            raise TypeError(f"{path} is a {type(value).__name__}")
        if isinstance(value, dict):
            for k, v in value.items():
                if type(k) not in _ALLOWED:
                    raise TypeError(f"{path} has a key of type {type(k).__name__}")
                stack.append((v, f"{path}[{k!r}]"))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(value))


def loads_data_pickle(data: bytes, *, name: str, option: str = "refs") -> Any:
    """Unpickle `data` (the bytes of file `name`) allowing only plain data; see the module doc."""
    fix = "pass the upstream data-only pickle (e.g. REFER's refs(unc).p), or its JSON form"
    try:
        obj = _DataOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except RefusedGlobal as err:
        raise InputError(
            f"--{option}: {name}: refused to load: the pickle names the global {err.module}.{err.name} "
            f"(a class or function; loading it could run code). Only dicts, lists, tuples, str, int, "
            f"float, bool and None are accepted; {fix}"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError,
            UnicodeDecodeError, MemoryError, RecursionError, OverflowError) as err:
        raise InputError(f"--{option}: {name} is not a readable data pickle ({type(err).__name__}: {err}); {fix}") from None
    try:
        _check(obj, "the pickle")
    except TypeError as err:
        raise InputError(f"--{option}: {name}: refused: {err}, not plain data; {fix}") from None
    return obj


def load_data_pickle(path: str | Path, *, option: str = "refs") -> tuple[Any, bytes]:
    """(object, raw bytes) of the pickle file at `path`; raises `InputError` when missing or refused."""
    p = Path(path)
    raw = read_annotation_file(p, option, "pass the REFER refs pickle of the release")
    return loads_data_pickle(raw, name=p.name, option=option), raw
