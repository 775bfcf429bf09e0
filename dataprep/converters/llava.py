"""LLaVA pretrain (558K) / instruct (665K) conversations -> chat records.

Upstream format (LLaVA `blip_laion_cc_sbu_558k.json`, `llava_v1_5_mix665k.json`): a JSON list of

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat ...?"}, {"from": "gpt", "value": "..."}, ...]}

`image` is relative to `--images` (the folder LLaVA calls `image_folder`).

`xsam data convert llava --out OUT --annotations llava_v1_5_mix665k.json --images DIR`

Record: key `make_key("llava", split, id)`; split from the annotation file name:
`blip_laion_cc_sbu_558k*` -> `pretrain`, `llava_v1_5_mix665k*` -> `instruct`, otherwise `--split`
or `default` (a `--split` that contradicts the file name is an input error). `conversations` = the
upstream turns exactly (`ChatTurn`, `from` human/gpt, `value` unchanged, `<image>` included: the
renderer moves it to the front); no segments; `source.upstream_ids = {"id": id}` (the id as given,
string or integer); `meta["upstream_index"]` = position in the JSON list.

Quarantine (record level, counted in records_read):
- an entry without `image` (the 665K mix has ~40K text-only ShareGPT records) -> `text_only`,
  as X-SAM trains on image records only; with `--keep-text-only` such an entry becomes a chat
  record with `image = None` (shard member `KEY.json` alone, no `<image>` in its items);
- malformed entry (no id, conversations not a list of {from: human|gpt, value: str}) ->
  `invalid_annotation`;
- two entries whose ids give the same key (the same id twice, or ids that differ only in case or in
  characters outside [a-z0-9_-], which `make_key` maps to `_`) -> `duplicate_id` for every entry
  after the first (in file order);
- image missing / unreadable -> `missing_file` / the image checks' reasons (worker side).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dataprep.converters.base import (
    Converted,
    ConvertOptions,
    Converter,
    Plan,
    UpstreamRecord,
    cached_tree,
    estimate_bytes,
    image_model,
    load_json_input,
    read_image,
)
from dataprep.quarantine import InputError, QuarantineRow
from dataprep.sources import open_tree
from xsam.data.schema import ChatTurn, Record, Source, make_key

CORPUS = "llava"
FIX = "pass a LLaVA conversation file such as llava_v1_5_mix665k.json or blip_laion_cc_sbu_558k.json (a JSON list)"
SPLIT_PATTERNS = ((re.compile(r"blip_laion_cc_sbu_558k"), "pretrain"), (re.compile(r"llava_v1_5_mix665k"), "instruct"))


def split_from_file_name(name: str) -> str | None:
    base = Path(name).name
    for pattern, split in SPLIT_PATTERNS:
        if pattern.search(base):
            return split
    return None


def check_entry(entry: Any) -> str | None:
    """Why a LLaVA list entry is malformed (None when it is fine; `image` is checked separately)."""
    if not isinstance(entry, dict):
        return f"entry is not an object: {str(entry)[:120]}"
    if not isinstance(entry.get("id"), (str, int)) or isinstance(entry.get("id"), bool) or entry.get("id") == "":
        return f"`id` must be a non-empty string or an integer, got {entry.get('id')!r}"
    image = entry.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        return f"`image` must be a file name, got {image!r}"
    conv = entry.get("conversations")
    if not isinstance(conv, list) or not conv:
        return "`conversations` must be a non-empty list"
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") or not isinstance(turn.get("value"), str):
            return f"conversations[{i}] must be {{from: human|gpt, value: str}}, got {str(turn)[:120]}"
    return None


class Llava(Converter):
    name = CORPUS
    task = "chat"
    version = "1"
    required_inputs = {
        "annotations": "LLaVA conversation JSON (blip_laion_cc_sbu_558k.json, llava_v1_5_mix665k.json)",
        "images": "folder or .zip/.tar that the `image` paths are relative to",
    }
    optional_inputs = {
        "split": "split name for the keys when the file name does not tell (default: default)",
        "keep_text_only": "keep records without an image (X-SAM drops them; default: quarantined as text_only)",
    }
    example = (
        "xsam data convert llava --out data/llava-instruct --annotations llava_v1_5_mix665k.json "
        "--images llava_images"
    )

    def __init__(self, **inputs: Any) -> None:
        super().__init__(**inputs)
        named = split_from_file_name(str(self.inputs["annotations"]))
        given = self.inputs.get("split")
        if named and given and make_key(given) != named:
            raise InputError(
                f"{self.name}: --split {given} contradicts the annotation file name, which says {named!r}; "
                "drop --split or rename the file"
            )
        self._split_name = named or (make_key(given) if given else "default")

    def parameters(self) -> dict[str, Any]:
        return {"split": self._split_name}

    def plan(self) -> Plan:
        path = self.inputs["annotations"]
        data, self._source = load_json_input(path, "annotations", FIX)
        if not isinstance(data, list):
            raise InputError(f"--annotations: {path} must be a JSON list of conversations; {FIX}")
        split = self._split_name
        src = self._source.name
        tree = open_tree(self.inputs["images"], option="--images")
        rows: list[QuarantineRow] = []
        records: list[UpstreamRecord] = []
        first_of_key: dict[str, Any] = {}

        def reject(record_id: str, key: str, reason: str, message: str) -> None:
            rows.append(QuarantineRow(level="record", source_file=src, record_id=record_id, part_id="", key=key,
                                      reason=reason, message=message))

        for i, entry in enumerate(data):
            why = check_entry(entry)
            if why is not None:
                rid = str(entry.get("id")) if isinstance(entry, dict) and entry.get("id") is not None else f"[{i}]"
                reject(rid, "", "invalid_annotation", f"entry [{i}]: {why}")
                continue
            uid = entry["id"]
            key = make_key(CORPUS, split, str(uid))
            text_only = "image" not in entry or entry["image"] is None
            if text_only and not self.inputs.get("keep_text_only"):
                reject(str(uid), key, "text_only",
                       f"entry [{i}] (id {uid!r}) has no image; X-SAM trains on image conversations only "
                       "(--keep-text-only keeps such records)")
                continue
            if key in first_of_key:
                first = first_of_key[key]
                same = "listed again" if first == uid else f"maps to the same key as id {first!r}"
                reject(str(uid), key, "duplicate_id", f"entry [{i}]: id {uid!r} {same} ({key}); the first entry was kept")
                continue
            first_of_key[key] = uid
            records.append(UpstreamRecord(
                key=key, record_id=str(uid), image_name="" if text_only else entry["image"],
                est_bytes=8192 if text_only else estimate_bytes(tree, entry["image"]),
                payload={"id": uid, "index": i, "image": None if text_only else entry["image"],
                         "conversations": entry["conversations"], "split": split},
            ))
        records.sort(key=lambda r: r.key)
        return Plan(records=records, quarantine=rows, inputs=[self._source], splits=[split])

    def convert(self, upstream: UpstreamRecord, options: ConvertOptions) -> Converted:
        pl = upstream.payload
        if pl["image"] is None:  # a text-only record (--keep-text-only)
            data, image = b"", None
        else:
            data, info = read_image(cached_tree(self.inputs["images"], "--images"), pl["image"], options)
            image = image_model(data, info, pl["image"], None)
        record = Record(
            key=upstream.key,
            task=self.task,
            source=Source(corpus=self.name, split=pl["split"], upstream_ids={"id": pl["id"]},
                          annotation_file=self._source.name, annotation_sha256=self._source.sha256),
            image=image,
            conversations=[ChatTurn.model_validate({"from": t["from"], "value": t["value"]}) for t in pl["conversations"]],
            meta={"upstream_index": pl["index"]},
        )
        return Converted(record=record, image_bytes=data, parts=[])


CONVERTER_CLASSES = (Llava,)
