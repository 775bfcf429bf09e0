"""Small example inputs in each corpus's EXACT upstream format, derived from the real COCO samples.

No real RefCOCO, gRefCOCO, ReasonSeg, GCG, LLaVA, COCO-Interactive or VGD file can be shipped here,
so each module builds one from the bundled real COCO images and annotations (`examples/corpora/`),
and labels everything it writes as derived. `xsam data make-examples` runs them; tests and
`make quickstart` convert the results.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# one module per family of corpora; each has build(corpora, out) -> {example name: {input option: value}}
# where the example name is a corpus name, or a corpus name plus "-variant" (e.g. "gcg-grandf")
MODULES = ("refer", "reasonseg", "llava", "coco_interactive", "coco_vgd", "gcg")


def corpus_of(example: str) -> str:
    """The corpus an example converts with: its name, or the longest corpus name it starts with."""
    from dataprep.converters import CONVERTERS

    if example in CONVERTERS:
        return example
    matches = [name for name in CONVERTERS if example.startswith(name + "-")]
    if not matches:
        raise KeyError(f"example {example!r} names no known corpus")
    return max(matches, key=len)


def make_examples(corpora: Path, out: Path) -> dict[str, dict[str, str]]:
    """Build every example corpus under `out/<module>/`; writes `out/examples.json` and returns
    {example name: convert inputs} (see `corpus_of` for the corpus of each)."""
    corpora, out = Path(corpora), Path(out)
    if not (corpora / "coco_instances_polygons").is_dir():
        raise FileNotFoundError(f"{corpora} does not hold the real COCO samples (coco_instances_polygons/ ...)")
    found: dict[str, dict[str, str]] = {}
    for name in MODULES:
        module = importlib.import_module(f"dataprep.examples.{name}")
        found.update(module.build(corpora, out / name))
    listing = {name: {"corpus": corpus_of(name), "inputs": inputs} for name, inputs in found.items()}
    (out / "examples.json").write_text(json.dumps(listing, indent=2, sort_keys=True) + "\n")
    return found
