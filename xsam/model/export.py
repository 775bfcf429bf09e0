"""The ONE inference layout of an X-SAM model: what `xsam predict`, evaluation and `export` read and write.

    DIR/
      model.safetensors   every parameter and persistent buffer of the stage's `XSam` (safetensors only)
      config.yaml         the resolved `XSamConfig`: self-contained (no `pretrained` folder is needed
                          again: each part's `config` is the architecture it was built with, the LLM's
                          vocabulary already resized), `llm.tokenizer: tokenizer`
      tokenizer/          the tokenizer, X-SAM's tokens added
      xsam.json           format, stage, parts, parameter counts, sha256 of model.safetensors, and the
                          caller's provenance (source checkpoint, run id, data) for lineage

DeepSpeed checkpoints are for resuming training only; a trainer converts its final state into this
layout. Loading never unpickles anything: safetensors + YAML (`safe_load`) + JSON + the tokenizer files.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from safetensors.torch import load_model, save_model

from xsam.data.storage import sha256_file
from xsam.model.build import build_xsam, count_parameters
from xsam.model.config import XSamConfig, load_model_config
from xsam.model.xsam import XSam

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT = "xsam-inference"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
META = "xsam.json"
TOKENIZER = "tokenizer"
# HF config keys that describe a saved file, not the architecture
_NOT_ARCHITECTURE = ("architectures", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
                     "output_hidden_states", "return_dict", "_attn_implementation_autoset")


class InferenceLayoutError(ValueError):
    """A folder that is not a complete inference layout; the message names the folder and the fix."""


@dataclass(kw_only=True)
class LoadedModel:
    model: XSam
    config: XSamConfig
    tokenizer: PreTrainedTokenizerBase
    stage: str
    meta: dict[str, Any]
    path: Path


def _architecture(hf_config: Any, *, keep_model_type: bool) -> dict[str, Any]:
    values = hf_config.to_dict()
    for key in _NOT_ARCHITECTURE:
        values.pop(key, None)
    if not keep_model_type:
        values.pop("model_type", None)
    return values


def resolved_config(model: XSam, config: XSamConfig) -> XSamConfig:
    """`config` with each built part's real architecture and no pretrained folders."""
    update: dict[str, Any] = {}
    if model.llm is not None:
        update["llm"] = config.llm.model_copy(update={
            "pretrained": None, "tokenizer": TOKENIZER, "config": _architecture(model.llm.config, keep_model_type=True),
        })
    if model.vision_encoder is not None:
        update["vision"] = config.vision.model_copy(update={
            "pretrained": None, "config": _architecture(model.vision_encoder.model.config, keep_model_type=False),
        })
    if model.seg_encoder is not None:
        update["seg_encoder"] = config.seg_encoder.model_copy(update={
            "pretrained": None, "config": _architecture(model.seg_encoder.model.config, keep_model_type=False),
        })
    return config.model_copy(update=update)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return sha256_file(f)


def save_inference(
    model: XSam,
    config: XSamConfig,
    tokenizer: PreTrainedTokenizerBase | None,
    out: str | Path,
    *,
    stage: str,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write the layout into `out` (created; written to `out.tmp-*` first, then renamed, so a
    crash never leaves a half layout under the final name). Returns `out`."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose a new folder (layouts are never overwritten)")
    if model.llm is not None and tokenizer is None:
        raise ValueError("a model with an LLM needs its tokenizer in the layout")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": FORMAT, "stage": stage})
        resolved = resolved_config(model, config)
        (tmp / CONFIG).write_text(yaml.safe_dump(resolved.to_dict(), sort_keys=False))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / TOKENIZER)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": config.name,
            "stage": stage,
            "parts": list(model.parts()),
            "parameters": count_parameters(model),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "files": {WEIGHTS: _sha256(tmp / WEIGHTS)},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "provenance": provenance or {},
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / META
    if not meta_file.is_file():
        raise InferenceLayoutError(
            f"{path} is not an X-SAM inference folder (no {META}); make one with `xsam model init`, "
            "`xsam import-official` or a training run's export"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise InferenceLayoutError(
            f"{meta_file}: format {meta.get('format')!r} v{meta.get('format_version')} is not "
            f"{FORMAT!r} v{FORMAT_VERSION}"
        )
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise InferenceLayoutError(f"{path}: {name} is missing; the folder is incomplete, export it again")
    return meta


def load_inference(
    path: str | Path, *, device: torch.device | str = "cpu", verify: bool = False
) -> LoadedModel:
    """Build the layout's model (random init, then every tensor from model.safetensors, strictly:
    a missing or unexpected tensor is an error naming it). `verify` re-hashes the weights first."""
    from xsam.text.tokenizer import load_tokenizer

    path = Path(path)
    meta = read_meta(path)
    if verify:
        actual = _sha256(path / WEIGHTS)
        if actual != meta["files"][WEIGHTS]:
            raise InferenceLayoutError(f"{path / WEIGHTS}: sha256 {actual} != {meta['files'][WEIGHTS]} in {META}")
    config = load_model_config(path / CONFIG, base=path)
    stage = meta["stage"]
    tokenizer = load_tokenizer(path / TOKENIZER) if (path / TOKENIZER).is_dir() else None
    model = build_xsam(config, stage=stage, pretrained=False, tokenizer=tokenizer,
                       resize_embeddings=tokenizer is not None)
    missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False, device=str(device))
    if missing or unexpected:
        raise InferenceLayoutError(
            f"{path / WEIGHTS} does not fit the {stage} model of {path / CONFIG}: "
            f"missing {sorted(missing)[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected {sorted(unexpected)[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    model.to(device).eval()
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, stage=stage, meta=meta, path=path)


@dataclass(kw_only=True)
class ParentReport:
    """What `load_parents` took from where: {source: [our keys]}, and the trainable-free keys left as built."""

    taken: dict[str, list[str]]
    kept: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"taken": {k: len(v) for k, v in self.taken.items()}, "kept": len(self.kept)}


def _covered(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def load_parents(model: XSam, parents: list[tuple[str | Path, tuple[str, ...]]]) -> ParentReport:
    """Initialise `model` from several inference folders (spec §4: stage 3 takes the stage-1 segmentor
    and the stage-2 projectors), each for the module prefixes it names. Strict: every tensor of the
    model under a parent's prefixes must be in that parent with the same shape, a tensor the parent has
    under those prefixes must exist in the model, and no two parents may cover the same tensor;
    anything else is an `InferenceLayoutError` naming the parent and the keys. Tensors outside every
    prefix keep what the model was built with (pretrained folders or random init)."""
    from safetensors.torch import load_file

    ours = model.state_dict()
    owner: dict[str, str] = {}
    taken: dict[str, list[str]] = {}
    for source, prefixes in parents:
        path = Path(source)
        read_meta(path)
        theirs = load_file(str(path / WEIGHTS))
        wanted = sorted(k for k in ours if _covered(k, prefixes))
        if not wanted:
            raise InferenceLayoutError(f"{path}: include {list(prefixes)} matches none of the model's tensors")
        offered = {k for k in theirs if _covered(k, prefixes)}
        missing = [k for k in wanted if k not in theirs]
        unexpected = sorted(offered - set(ours))
        shapes = [f"{k} {tuple(theirs[k].shape)} vs {tuple(ours[k].shape)}" for k in wanted
                  if k in theirs and theirs[k].shape != ours[k].shape]
        twice = [f"{k} (also from {owner[k]})" for k in wanted if k in owner]
        if missing or unexpected or shapes or twice:
            parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                     f"shapes differ: {shapes[:5]}" if shapes else "", f"covered twice: {twice[:5]}" if twice else ""]
            raise InferenceLayoutError(
                f"parent {path} for {list(prefixes)}: " + "; ".join(p for p in parts if p)
                + " (check `include`, or the stage and config the parent was trained with)"
            )
        with torch.no_grad():
            for k in wanted:
                ours[k].copy_(theirs[k])
                owner[k] = str(path)
        taken[str(path)] = wanted
    return ParentReport(taken=taken, kept=sorted(set(ours) - set(owner)))
