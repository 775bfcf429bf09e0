"""`xsam model summary|init`, `xsam predict`, `xsam import-official` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import REPO, invoke_cli, run_cli
from PIL import Image
from safetensors.torch import load_file, save_file

from xsam.model.official import ours_to_official

TINY = REPO / "configs" / "model" / "tiny.yaml"
PAPER = REPO / "configs" / "model" / "xsam-paper.yaml"
IMAGE = REPO / "examples" / "corpora" / "coco_panoptic" / "val2017" / "000000439180.jpg"


def test_summary_of_the_paper_config_needs_no_weights() -> None:
    proc = run_cli("model", "summary", "--config", str(PAPER), "--json")
    doc = json.loads(proc.stdout)
    parts = doc["parts"]
    assert parts["llm"]["total"] == 3_821_079_552
    assert parts["vision_encoder"]["built_in"] == ["stage2", "stage3"]
    assert parts["decoder"]["built_in"] == ["stage1", "stage3"]
    # stage 2 trains the two projectors only; stage 3 everything but the encoders' unused tails
    assert doc["stages"]["stage2"]["trainable"] == parts["visual_projector"]["total"] + parts["seg_projector"]["total"]
    assert parts["llm"]["trainable"]["stage3"] == parts["llm"]["total"]
    assert parts["vision_encoder"]["trainable"]["stage3"] < parts["vision_encoder"]["total"]
    assert "tokenizer folder is not here" in doc["note"]
    table = invoke_cli("model", "summary", "--config", str(PAPER)).stdout
    assert "3,821.08" in table and "seg_connector" in table


def test_init_predict_writes_png_and_json(tmp_path: Path) -> None:
    layout = tmp_path / "tiny"
    run_cli("model", "init", "--config", str(TINY), "--random", "--out", str(layout))
    assert json.loads((layout / "xsam.json").read_text())["provenance"]["kind"] == "init"
    again = invoke_cli("model", "init", "--config", str(TINY), "--random", "--out", str(layout), check=False)
    assert again.returncode == 2 and "already exists" in again.stderr

    out = tmp_path / "pred" / "horses.png"
    proc = invoke_cli("predict", "--model", str(TINY), "--checkpoint", str(layout), "--image", str(IMAGE),
                   "--task", "refseg", "--prompt", "the horse on the left", "--out", str(out))
    assert "the horse on the left: score" in proc.stdout
    with Image.open(out) as picture:
        assert picture.size == (640, 360)
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["task"] == "refseg" and doc["image_size"] == [360, 640] and len(doc["masks"]) == 1

    vgd = invoke_cli("predict", "--model", str(TINY), "--checkpoint", str(layout), "--image", str(IMAGE),
                  "--task", "vgdseg", "--point", "150,250", "--box", "400,150,480,300", "--out", str(tmp_path / "v.png"))
    assert vgd.returncode == 0
    bad = invoke_cli("predict", "--model", str(TINY), "--checkpoint", str(layout), "--image", str(IMAGE),
                  "--task", "intseg", "--point", "150", "--out", str(tmp_path / "x.png"), check=False)
    assert bad.returncode == 2 and "--point '150'" in bad.stderr
    wrong = invoke_cli("predict", "--model", str(PAPER), "--checkpoint", str(layout), "--image", str(IMAGE),
                    "--task", "refseg", "--prompt", "a horse", "--out", str(tmp_path / "y.png"), check=False)
    assert wrong.returncode == 2 and "describe different models" in wrong.stderr


def test_import_official_round_trip_and_strictness(tmp_path: Path) -> None:
    """A release-format file (official key names, `pytorch_model.bin`) made from a tiny layout imports
    back to the same tensors; an extra released tensor makes the import fail, naming it."""
    layout = tmp_path / "tiny"
    invoke_cli("model", "init", "--config", str(TINY), "--random", "--out", str(layout))
    ours = load_file(layout / "model.safetensors")
    released = {ours_to_official(k): v for k, v in ours.items()}
    assert None not in released
    release = tmp_path / "release"
    release.mkdir()
    torch.save(released, release / "pytorch_model.bin")
    imported = tmp_path / "imported"
    proc = run_cli("import-official", str(release), "--config", str(TINY), "--out", str(imported))
    assert "tensors from the release" in proc.stdout
    back = load_file(imported / "model.safetensors")
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    provenance = json.loads((imported / "xsam.json").read_text())["provenance"]
    assert provenance["kind"] == "import-official" and provenance["source"] == str(release.resolve())

    extra = tmp_path / "extra"
    extra.mkdir()
    save_file({**{k: v.contiguous() for k, v in released.items()}, "pad_embeds.weight": torch.zeros(1, 4)},
              extra / "model.safetensors")
    failed = invoke_cli("import-official", str(extra), "--config", str(TINY), "--out", str(tmp_path / "no"), check=False)
    assert failed.returncode == 1 and "unmatched: pad_embeds.weight" in failed.stderr
    assert not (tmp_path / "no").exists()
