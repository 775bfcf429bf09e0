"""`xsam model summary|init`, `xsam predict` and `xsam import-official`: thin wrappers over `xsam.model`.

Every model these verbs write is an inference layout (`xsam.model.export`): safetensors + the
resolved config + the tokenizer, the one format predict and evaluation read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table

from pipelines.cli.output import err_console, fail, out_console

app = typer.Typer(help="X-SAM models: parameter summaries, new inference folders.", no_args_is_help=True)


def _config(path: Path):
    from xsam.model.config import ModelConfigError, load_model_config

    try:
        return load_model_config(path)
    except ModelConfigError as err:
        fail(str(err))
    raise AssertionError("unreachable")


@app.command("summary")
def summary(
    config: Path = typer.Option(..., "--config", help="model config YAML, e.g. configs/model/xsam-paper.yaml"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Parameters per part: total, and trainable under each stage's freezing (built on the meta device:
    no memory, no weights).

    Example: xsam model summary --config configs/model/xsam-paper.yaml
    """
    import torch

    from xsam.model.build import available_tokenizer, build_xsam, count_parameters

    cfg = _config(config)
    tokenizer = available_tokenizer(cfg) if any("llm" in s.components for s in cfg.stages.values()) else None
    per_stage = {}
    for name in cfg.stages:
        with torch.device("meta"):
            model = build_xsam(cfg, stage=name, pretrained=False, tokenizer=tokenizer,
                               resize_embeddings=tokenizer is not None)
        per_stage[name] = count_parameters(model)
    parts: dict[str, int] = {}
    for counts in per_stage.values():  # the largest build of each part (class_head: stage 1's linear head)
        for part, c in counts.items():
            parts[part] = max(parts.get(part, 0), c["total"])
    note = None if tokenizer is not None else (
        "the tokenizer folder is not here: the LLM keeps the config's vocab_size (the real model resizes it to "
        "len(tokenizer) + 3 added tokens)"
    )
    doc = {
        "config": str(config), "name": cfg.name,
        "parts": {p: {"total": t, "trainable": {s: per_stage[s].get(p, {}).get("trainable", 0) for s in per_stage},
                      "total_per_stage": {s: per_stage[s][p]["total"] for s in per_stage if p in per_stage[s]},
                      "built_in": [s for s in per_stage if p in per_stage[s]]} for p, t in parts.items()},
        "stages": {s: {"total": sum(c["total"] for c in per_stage[s].values()),
                       "trainable": sum(c["trainable"] for c in per_stage[s].values())} for s in per_stage},
        "note": note,
    }
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    table = Table(title=f"{cfg.name}: parameters (M), trainable per stage (--json: exact)", box=box.SIMPLE_HEAD)
    table.add_column("part", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    for s in per_stage:
        table.add_column(s, justify="right", no_wrap=True)

    def millions(n: int) -> str:
        return f"{n / 1e6:,.2f}"

    for part, info in doc["parts"].items():
        cells = [millions(info["trainable"][s]) if s in info["built_in"] else "-" for s in per_stage]
        table.add_row(part, millions(info["total"]), *cells)
    table.add_section()
    table.add_row("built", "", *[millions(doc["stages"][s]["total"]) for s in per_stage])
    table.add_row("trainable", "", *[millions(doc["stages"][s]["trainable"]) for s in per_stage])
    out_console.print(table)
    if note:
        err_console.print(f"note: {note}")


@app.command("init")
def init(
    config: Path = typer.Option(..., "--config", help="model config YAML"),
    out: Path = typer.Option(..., "--out", help="new inference folder to create"),
    stage: str = typer.Option("stage3", "--stage", help="which stage's parts to build"),
    pretrained: bool = typer.Option(True, "--pretrained/--random", help="load the config's pretrained folders"),
    seed: int = typer.Option(0, "--seed", help="seed of the random initialisation"),
) -> None:
    """Build a model from its config (pretrained parts, or random init) and write an inference folder.

    Example: xsam model init --config configs/model/tiny.yaml --random --out runs/tiny-init
    """
    import torch

    from xsam.model.build import build_xsam, tokenizer_for
    from xsam.model.export import save_inference

    cfg = _config(config)
    if out.exists():
        fail(f"{out} already exists; choose a new folder (layouts are never overwritten)")
    torch.manual_seed(seed)
    try:
        tokenizer = tokenizer_for(cfg) if "llm" in cfg.stage(stage).components else None
        model = build_xsam(cfg, stage=stage, pretrained=pretrained, tokenizer=tokenizer)
        save_inference(model, cfg, tokenizer, out, stage=stage,
                       provenance={"kind": "init", "config": str(config), "pretrained": pretrained, "seed": seed})
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        fail(str(err))
    out_console.print(f"wrote {out} ({stage}, {'pretrained' if pretrained else 'random'} init)")


def _pair(text: str, n: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != n:
        fail(f"--{what} {text!r}: expected {n} comma-separated numbers")
    return values


_ARCHITECTURE_KEYS = ("projector", "connector", "decoder", "sampler", "preprocess")


def predict(
    model: Path = typer.Option(..., "--model", help="model config YAML (post-processing thresholds; checked "
                                                     "against the checkpoint's architecture)"),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="inference folder (model.safetensors + config)"),
    image: Path = typer.Option(..., "--image", help="an RGB image (jpg/png)"),
    task: str = typer.Option(..., "--task", help="genseg, ovseg, refseg, reaseg, intseg, vgdseg or gcgseg"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="expression / question, or 'cat, dog, sky'"),
    point: list[str] = typer.Option([], "--point", help="x,y in image pixels (intseg/vgdseg; repeatable)"),
    box_: list[str] = typer.Option([], "--box", help="x0,y0,x1,y1 in image pixels (intseg/vgdseg; repeatable)"),
    out: Path = typer.Option(..., "--out", help="PNG to write; the JSON goes next to it (same name, .json)"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1 ..."),
) -> None:
    """Segment one image: writes OUT.png (image, masks, labels) and OUT.json (RLE masks, scores).

    Example: xsam predict --model configs/model/tiny.yaml --checkpoint runs/tiny-init
    --image examples/corpora/coco_panoptic/val2017/000000439180.jpg --task refseg
    --prompt "the horse on the left" --out predictions/horse.png
    """
    import numpy as np
    from PIL import Image as PILImage

    from xsam.model.export import InferenceLayoutError, load_inference
    from xsam.model.predict import Predictor
    from xsam.model.visualize import overlay, save_png

    cfg = _config(model)
    if not image.is_file():
        fail(f"--image {image}: no such file")
    try:
        loaded = load_inference(checkpoint, device=device)
    except (InferenceLayoutError, FileNotFoundError) as err:
        fail(str(err))
    differs = [k for k in _ARCHITECTURE_KEYS if getattr(cfg, k) != getattr(loaded.config, k)]
    if differs:
        fail(f"--model {model} and --checkpoint {checkpoint} describe different models (keys {differs}); "
             f"pass the config the checkpoint was trained with")
    loaded.config = loaded.config.model_copy(update={"postprocess": cfg.postprocess})
    data = image.read_bytes()
    try:
        predictor = Predictor(loaded, device=device)
        result = predictor.predict(data, task, prompt=prompt, points=[_pair(p, 2, "point") for p in point],
                                   boxes=[_pair(b, 4, "box") for b in box_])
    except ValueError as err:
        fail(str(err))
    with PILImage.open(image) as im:
        pixels = np.asarray(im.convert("RGB"))
    picture = overlay(pixels, [m.mask for m in result.masks], [m.label for m in result.masks],
                      scores=[m.score for m in result.masks])
    save_png(picture, out)
    out_json = out.with_suffix(".json")
    out_json.write_text(json.dumps({**result.to_json(), "image": str(image), "checkpoint": str(checkpoint)}) + "\n")
    if result.text:
        out_console.print(f"generated: {result.text}", markup=False, soft_wrap=True)
    for m in result.masks:
        out_console.print(f"{m.label}: score {m.score:.3f}, {int(m.mask.sum())} pixels", markup=False)
    out_console.print(f"wrote {out} and {out_json}")


def import_official(
    directory: Path = typer.Argument(..., help="released X-SAM weights (pytorch_model.bin or safetensors)"),
    config: Path = typer.Option(..., "--config", help="model config of the release, e.g. configs/model/xsam-paper.yaml"),
    out: Path = typer.Option(..., "--out", help="new inference folder to create"),
    stage: str = typer.Option("stage3", "--stage", help="the stage the release belongs to"),
    base: str = typer.Option("none", "--base", help="'none': the release must hold every tensor; 'pretrained': "
                                                     "tensors it lacks come from the config's pretrained folders "
                                                     "(a stage-2 release holds only the projectors)"),
) -> None:
    """Load the released X-SAM weights into our modules through the explicit key map; strict.

    Example: xsam import-official inits/X-SAM/s3_mixed_finetune/xsam_phi3... --config configs/model/xsam-paper.yaml
    --out models/xsam-paper
    """
    import torch

    from xsam.model.build import build_xsam, tokenizer_for
    from xsam.model.export import save_inference
    from xsam.model.official import convert_official_state_dict, read_official_dir

    if base not in ("none", "pretrained"):
        fail(f"--base {base!r}: choose 'none' or 'pretrained'")
    cfg = _config(config)
    try:
        state = read_official_dir(directory)
        tokenizer = tokenizer_for(cfg) if "llm" in cfg.stage(stage).components else None
        model = build_xsam(cfg, stage=stage, pretrained=base == "pretrained", tokenizer=tokenizer)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    ours = model.state_dict()
    report = convert_official_state_dict(state, ours.keys())
    err_console.print(report.summary())
    for key in report.unmatched_official:
        err_console.print(f"unmatched: {key}")
    shapes = [f"{k}: release {tuple(v.shape)} vs ours {tuple(ours[k].shape)}" for k, v in report.state.items()
              if tuple(v.shape) != tuple(ours[k].shape)]
    problems = []
    if report.unmatched_official:
        problems.append(f"{len(report.unmatched_official)} released tensors have no place in the {stage} model")
    if shapes:
        problems.append("shape mismatches:\n  " + "\n  ".join(shapes[:20]))
    if report.missing and base == "none":
        problems.append(f"{len(report.missing)} tensors are not in the release (first: {report.missing[:5]}); "
                        "pass --base pretrained to take them from the config's pretrained folders")
    if problems:
        fail("; ".join(problems), code=1)
    with torch.no_grad():
        model.load_state_dict(report.state, strict=False)
    try:
        save_inference(model, cfg, tokenizer, out, stage=stage, provenance={
            "kind": "import-official", "source": str(directory.resolve()), "config": str(config),
            "base": base, "from_release": len(report.state), "from_base": len(report.missing),
        })
    except FileExistsError as err:
        fail(str(err))
    out_console.print(f"wrote {out}: {len(report.state)} tensors from the release, {len(report.missing)} from the base")
