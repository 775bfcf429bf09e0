"""The ADE20K class tables shipped as package data (`dataprep/data/ade20k/`, see PROVENANCE.md there).

- `object150_info.csv`: the SceneParsing-150 classes (`Idx,Ratio,Train,Val,Stuff,Name`);
- `ade20k_instance_catid_mapping.txt`: the 100 instance classes -> their 150-class ids;
- `ade20k_150_names.tsv`: display names (the csv's words with their spaces restored).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
from dataclasses import dataclass
from importlib import resources
from typing import Any

from dataprep.quarantine import InputError

NUM_CLASSES = 150
NUM_INSTANCE_CLASSES = 100
TABLE_FILES = ("object150_info.csv", "ade20k_instance_catid_mapping.txt", "ade20k_150_names.tsv")
FIX_TABLES = "reinstall xsam-pipeline (the ADE20K tables are package data under dataprep/data/ade20k/)"


# ---- the upstream class tables (package data) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class AdeTables:
    """SceneParsing-150 names and the 100 instance classes <-> 150 ids mapping."""

    names: dict[int, str]  # 1..150 -> display name, e.g. "coffee table, cocktail table"
    semantic_of_instance: dict[int, int]  # instance class 1..100 -> 1..150
    instance_of_semantic: dict[int, int]  # the inverse (a bijection upstream)
    sha256: dict[str, str]  # table file name -> sha256

    def categories(self) -> list[dict[str, Any]]:
        """The dataset category table: 150 entries in id order (dataset.json `categories`)."""
        return [
            {
                "id": cid,
                "name": name,
                "isthing": cid in self.instance_of_semantic,
                "instance_id": self.instance_of_semantic.get(cid),
            }
            for cid, name in sorted(self.names.items())
        ]


def parse_object150(text: str, source: str = "object150_info.csv") -> dict[int, str]:
    """`Idx,Ratio,Train,Val,Stuff,Name` -> {Idx: Name}; Idx must be exactly 1..150."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [h.strip() for h in rows[0]] != ["Idx", "Ratio", "Train", "Val", "Stuff", "Name"]:
        raise InputError(f"{source}: expected the header Idx,Ratio,Train,Val,Stuff,Name; {FIX_TABLES}")
    names: dict[int, str] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 6 or not row[0].strip().isdigit() or not row[5].strip():
            raise InputError(f"{source} line {n}: malformed row {row!r}; {FIX_TABLES}")
        names[int(row[0])] = row[5].strip()
    if sorted(names) != list(range(1, NUM_CLASSES + 1)):
        raise InputError(f"{source}: class ids must be exactly 1..{NUM_CLASSES}; {FIX_TABLES}")
    return names


def parse_display_names(text: str, csv_names: dict[int, str], source: str = "ade20k_150_names.tsv") -> dict[int, str]:
    """`id<TAB>name` rows -> {id: display name}, checked against object150_info.csv.

    The csv writes `;` both between synonyms and between the words of one name
    ("coffee;table;cocktail;table"), so prompts cannot be built from it ("coffee" and "screen" twice).
    The display table spells the same words with their spaces and `, ` between synonyms (the
    detectron2/Mask2Former spelling X-SAM's ADE20K categories use); every row must hold exactly the
    csv's words.
    """
    names: dict[int, str] = {}
    lines = text.splitlines()
    if not lines or lines[0].split("\t") != ["id", "name"]:
        raise InputError(f"{source}: expected the header 'id<TAB>name'; {FIX_TABLES}")
    for n, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].isdigit():
            raise InputError(f"{source} line {n}: malformed row {line!r}; {FIX_TABLES}")
        cid, name = int(fields[0]), fields[1].strip()
        words = sorted(name.replace(", ", ";").replace(" ", ";").split(";"))
        if cid not in csv_names or words != sorted(csv_names[cid].split(";")):
            raise InputError(f"{source} line {n}: {name!r} does not hold the words of class {cid} "
                             f"{csv_names.get(cid)!r} in object150_info.csv; {FIX_TABLES}")
        names[cid] = name
    if sorted(names) != sorted(csv_names):
        raise InputError(f"{source}: class ids must be exactly 1..{NUM_CLASSES}; {FIX_TABLES}")
    return names


def parse_instance_mapping(text: str, source: str = "ade20k_instance_catid_mapping.txt") -> dict[int, int]:
    """Header line, then `instance100 sceneparse150 fullade20k` rows -> {instance class: 150 id}."""
    mapping: dict[int, int] = {}
    for n, line in enumerate(text.splitlines()[1:], start=2):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or not all(f.isdigit() for f in fields):
            raise InputError(f"{source} line {n}: expected three integers, got {line!r}; {FIX_TABLES}")
        ins, sem = int(fields[0]), int(fields[1])
        # Upstream lists some instance classes twice (two full-ADE20K objects), with one 150 id.
        if mapping.setdefault(ins, sem) != sem:
            raise InputError(
                f"{source} line {n}: instance class {ins} mapped to {mapping[ins]} and {sem}; {FIX_TABLES}"
            )
    if sorted(mapping) != list(range(1, NUM_INSTANCE_CLASSES + 1)):
        raise InputError(f"{source}: instance classes must be exactly 1..{NUM_INSTANCE_CLASSES}; {FIX_TABLES}")
    if len(set(mapping.values())) != len(mapping) or not all(1 <= s <= NUM_CLASSES for s in mapping.values()):
        raise InputError(f"{source}: instance classes must map one-to-one onto ids 1..{NUM_CLASSES}; {FIX_TABLES}")
    return mapping


@functools.cache
def load_tables() -> AdeTables:
    """The packaged tables (dataprep/data/ade20k/, see PROVENANCE.md there), parsed once per process."""
    folder = resources.files("dataprep").joinpath("data", "ade20k")
    raw = {}
    for name in TABLE_FILES:
        try:
            raw[name] = folder.joinpath(name).read_bytes()
        except OSError as err:
            raise InputError(f"ADE20K table {name} is missing ({err}); {FIX_TABLES}") from err
    names = parse_display_names(
        raw[TABLE_FILES[2]].decode("utf-8"), parse_object150(raw[TABLE_FILES[0]].decode("utf-8"))
    )
    sem_of_ins = parse_instance_mapping(raw[TABLE_FILES[1]].decode("utf-8"))
    return AdeTables(
        names=names,
        semantic_of_instance=sem_of_ins,
        instance_of_semantic={s: i for i, s in sem_of_ins.items()},
        sha256={name: hashlib.sha256(data).hexdigest() for name, data in raw.items()},
    )
