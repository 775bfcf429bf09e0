"""A small LLaVA-665K-style conversation file DERIVED from the real COCO samples.

    out/llava_v1_5_mix665k.json   (a JSON list of {id, image, conversations}; one text-only entry)
    out/images/coco/val2017/000000039769.png, 000000439180.jpg   (real bytes, unchanged)

Conversations are written by hand from the images' real COCO categories (cats, remotes, couch;
people on horses); `<image>` sits in the first human turn, as in LLaVA.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FILE = "llava_v1_5_mix665k.json"


def entries() -> list[dict]:
    return [
        {
            "id": "000000039769",
            "image": "coco/val2017/000000039769.png",
            "conversations": [
                {"from": "human", "value": "<image>\nHow many cats are in the image?"},
                {"from": "gpt", "value": "There are two cats in the image, both lying on a pink couch."},
                {"from": "human", "value": "What objects are next to them?"},
                {"from": "gpt", "value": "Two remote controls lie on the couch near the cats."},
            ],
        },
        {
            "id": "000000439180",
            "image": "coco/val2017/000000439180.jpg",
            "conversations": [
                {"from": "human", "value": "What are the people doing?\n<image>"},
                {"from": "gpt", "value": "They are riding horses across an open field."},
            ],
        },
        {
            "id": "GCC_train_000439180.v2",
            "image": "coco/val2017/000000439180.jpg",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image briefly."},
                {"from": "gpt", "value": "A group of riders on horseback."},
                {"from": "human", "value": "Is it indoors?"},
                {"from": "gpt", "value": "No, the scene is outdoors on grass."},
            ],
        },
        {
            "id": "i6IyJda_0",
            "conversations": [
                {"from": "human", "value": "Write one sentence about cats."},
                {"from": "gpt", "value": "Cats sleep for most of the day."},
            ],
        },
    ]


def build(corpora: Path, out: Path) -> dict[str, dict[str, str]]:
    corpora, out = Path(corpora), Path(out)
    if out.exists():
        shutil.rmtree(out)
    images = out / "images" / "coco" / "val2017"
    images.mkdir(parents=True)
    shutil.copyfile(corpora / "coco_instances_polygons/val2017/000000039769.png", images / "000000039769.png")
    shutil.copyfile(corpora / "coco_instances/val2017/000000439180.jpg", images / "000000439180.jpg")
    (out / FILE).write_text(json.dumps(entries(), indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(
        "# LLaVA example (DERIVED, not the real release)\n\n"
        f"`{FILE}` imitates LLaVA-665K's format: 3 image conversations over the real COCO val2017 images "
        "000000039769 (PNG) and 000000439180 (JPEG), copied unchanged under `images/coco/val2017/`, plus one "
        "text-only entry (no `image`). The conversation texts were written by hand from the images' real "
        "COCO categories.\n",
        encoding="utf-8",
    )
    return {"llava": {"annotations": str(out / FILE), "images": str(out / "images")}}
