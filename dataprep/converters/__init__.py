"""One converter per corpus; `CONVERTERS` maps the `xsam data convert CORPUS` name to its class."""

from __future__ import annotations

from dataprep.converters import coco_interactive, coco_vgd, gcg, llava, reasonseg, refer
from dataprep.converters.ade20k import Ade20k
from dataprep.converters.base import Converter
from dataprep.converters.coco_instances import CocoInstances
from dataprep.converters.coco_panoptic import CocoPanoptic

CONVERTERS: dict[str, type[Converter]] = {
    cls.name: cls
    for cls in (
        CocoPanoptic,
        CocoInstances,
        Ade20k,
        *refer.CONVERTER_CLASSES,
        *reasonseg.CONVERTER_CLASSES,
        *gcg.CONVERTER_CLASSES,
        *coco_interactive.CONVERTER_CLASSES,
        *coco_vgd.CONVERTER_CLASSES,
        *llava.CONVERTER_CLASSES,
    )
}


def get_converter(name: str) -> type[Converter]:
    if name not in CONVERTERS:
        raise KeyError(f"unknown corpus {name!r}; known: {', '.join(sorted(CONVERTERS))} (see `xsam data list-corpora`)")
    return CONVERTERS[name]
