"""A small ReasonSeg release (LISA layout) DERIVED from the real COCO samples.

    out/ReasonSeg/train/<flickr-style name>.jpg + .json   (LabelMe-style: text, is_sentence, shapes)
    out/ReasonSeg/val/<name>.jpg + .json
    out/ReasonSeg/explanatory/train.json                  ([{image, query, outputs}])

Images are the real COCO val2017 bytes, copied unchanged under LISA-style names (LISA globs `*.jpg`;
image 39769 keeps its PNG bytes under a `.jpg` name, the converter reads the format from the magic
bytes). Shapes are the real COCO polygons of image 39769 (cats, remote, couch) and, for image
439180, the real bbox of its largest person as a 4-point polygon. Queries and explanations are
written by hand from those categories and geometry. One JSON is written in cp1252 with a non-ASCII
character, as some release files are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

POLY_IMAGE = "000000039769"
JPEG_IMAGE = "000000439180"
CAT_LEFT, CAT_RIGHT, REMOTE_LEFT, REMOTE_RIGHT, COUCH, BED = 2190839, 2190842, 1110067, 1108446, 1605237, 1612051
NAME_CATS = "8126463546_62c7d1d3b6_o"  # train, cp1252, target + ignore + flag
NAME_REMOTES = "2407212034_7b6f0c2f1e_o"  # train, short query, two targets
NAME_RIDER = "9275116980_1d9b986e3b_z"  # val (the image's real flickr name)


def _points(flat: list[float]) -> list[list[float]]:
    return [[flat[i], flat[i + 1]] for i in range(0, len(flat), 2)]


def _shape(label: str, points: list[list[float]]) -> dict:
    return {"label": label, "points": points, "group_id": None, "shape_type": "polygon", "flags": {}}


def _labelme(text: list[str], is_sentence: bool, shapes: list[dict], name: str, h: int, w: int) -> dict:
    return {
        "text": text, "is_sentence": is_sentence, "version": "5.1.1", "flags": {}, "shapes": shapes,
        "imagePath": f"{name}.jpg", "imageData": None, "imageHeight": h, "imageWidth": w,
    }


def build(corpora: Path, out: Path) -> dict[str, dict[str, str]]:
    corpora, out = Path(corpora), Path(out)
    root = out / "ReasonSeg"
    if root.exists():
        shutil.rmtree(root)
    train, val, expl = root / "train", root / "val", root / "explanatory"
    for d in (train, val, expl):
        d.mkdir(parents=True)

    poly = json.loads((corpora / "coco_instances_polygons/annotations/instances_val2017.json").read_text())
    anns = {a["id"]: a for a in poly["annotations"]}
    png = (corpora / f"coco_instances_polygons/val2017/{POLY_IMAGE}.png").read_bytes()
    jpg = (corpora / f"coco_instances/val2017/{JPEG_IMAGE}.jpg").read_bytes()

    # 1. cats: target = left cat, ignore = the left remote (lying on it), flag = the couch; cp1252
    cats = _labelme(
        [
            "the animal that someone could pet without waking the other one, the cat’s head next to the remote",
            "which pet is lying closest to the left armrest of the couch?",
        ],
        True,
        [
            _shape("flag", _points(anns[COUCH]["segmentation"][0])),
            _shape("target", _points(anns[CAT_LEFT]["segmentation"][0])),
            _shape("ignore", _points(anns[REMOTE_LEFT]["segmentation"][0])),
        ],
        NAME_CATS, 480, 640,
    )
    (train / f"{NAME_CATS}.jpg").write_bytes(png)
    (train / f"{NAME_CATS}.json").write_bytes(json.dumps(cats, indent=2, ensure_ascii=False).encode("cp1252"))

    # 2. remotes: two target shapes, short query, UTF-8
    remotes = _labelme(
        ["remote controls"], False,
        [_shape("target", _points(anns[REMOTE_LEFT]["segmentation"][0])),
         _shape("target", _points(anns[REMOTE_RIGHT]["segmentation"][0]))],
        NAME_REMOTES, 480, 640,
    )
    (train / f"{NAME_REMOTES}.jpg").write_bytes(png)
    (train / f"{NAME_REMOTES}.json").write_text(json.dumps(remotes, indent=2) + "\n", encoding="utf-8")

    # 3. val: the largest person of image 439180, its real bbox as a polygon; one query
    det = json.loads((corpora / "coco_instances/annotations/panoptic_coco_detection_format.json").read_text())
    people = [a for a in det["annotations"] if a["category_id"] == 1 and not a.get("iscrowd")]
    x, y, w, h = max(people, key=lambda a: (a["area"], -a["id"]))["bbox"]
    rider = _labelme(
        ["the person who controls where the animal goes"], True,
        [_shape("target", [[x, y], [x + w, y], [x + w, y + h], [x, y + h]])],
        NAME_RIDER, 360, 640,
    )
    (val / f"{NAME_RIDER}.jpg").write_bytes(jpg)
    (val / f"{NAME_RIDER}.json").write_text(json.dumps(rider, indent=2) + "\n", encoding="utf-8")

    explanatory = [
        {
            "image": f"{NAME_CATS}.jpg",
            "query": cats["text"][0],
            "outputs": "The cat on the left is curled up on its own, so it can be petted without disturbing the other cat.",
        }
    ]
    (expl / "train.json").write_text(json.dumps(explanatory, indent=2) + "\n", encoding="utf-8")
    (root / "README.md").write_text(
        "# ReasonSeg example (DERIVED, not the real release)\n\n"
        f"Built by `dataprep/examples/reasonseg.py` from the real COCO val2017 samples: images {POLY_IMAGE} "
        f"(PNG bytes, unchanged, named `{NAME_CATS}.jpg` and `{NAME_REMOTES}.jpg`) and {JPEG_IMAGE} "
        f"(JPEG bytes, unchanged, `val/{NAME_RIDER}.jpg`).\n"
        f"Shapes: the real COCO polygons of {POLY_IMAGE} (left cat = target, left remote = ignore, couch = "
        f"flag; both remotes = targets) and the real bbox of the largest person of {JPEG_IMAGE} as a polygon.\n"
        "Queries (`text`) and the explanation in `explanatory/train.json` were written by hand from those "
        f"categories and their geometry. `train/{NAME_CATS}.json` is cp1252-encoded (it holds U+2019).\n",
        encoding="utf-8",
    )
    return {"reasonseg": {"src": str(train), "explanations": str(expl / "train.json")}}
