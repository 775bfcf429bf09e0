"""One converter per corpus; `CONVERTERS` maps the `xsam data convert CORPUS` name to its class."""

from __future__ import annotations

import importlib

from dataprep.converters.ade20k import Ade20k
from dataprep.converters.base import Converter
from dataprep.converters.coco_instances import CocoInstances
from dataprep.converters.coco_panoptic import CocoPanoptic

CONVERTERS: dict[str, type[Converter]] = {c.name: c for c in (CocoPanoptic, CocoInstances, Ade20k)}

# TEMPORARY (integration of the issue-3 converters in progress): modules are registered as they land.
for _module in ("refer", "reasonseg", "llava", "coco_interactive", "coco_vgd", "gcg"):
    try:
        _mod = importlib.import_module(f"dataprep.converters.{_module}")
    except ModuleNotFoundError as _err:
        if _err.name != f"dataprep.converters.{_module}":
            raise
        continue
    for _cls in getattr(_mod, "CONVERTER_CLASSES", ()):
        CONVERTERS[_cls.name] = _cls


def get_converter(name: str) -> type[Converter]:
    if name not in CONVERTERS:
        raise KeyError(f"unknown corpus {name!r}; known: {', '.join(sorted(CONVERTERS))} (see `xsam data list-corpora`)")
    return CONVERTERS[name]
