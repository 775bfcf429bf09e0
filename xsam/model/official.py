"""Key map from the released X-SAM weights (Hugging Face `hao9610/X-SAM`) onto our `XSam` modules.

The release holds one flat `pytorch_model.bin` per stage directory (`s1_seg_finetune/<config>/`,
`s2_align_pretrain/<config>/`, `s3_mixed_finetune/<config>/`; README.md:283 on the `AAAI26_Archive` branch of
github.com/wanghao9610/X-SAM). It is the state dict of the paper branch's `XSamModel` as written by
`PTCheckpointHook` (xsam/xsam/engine/hooks/pt_checkpoint_hook.py:40-44), so its keys are that module's attribute
paths, with the old (paper) naming: `visual_encoder.*`, `segmentor.logit_scale`, `segmentor.class_predictor.*`,
`bg_embeds.weight` (spec §4 "Checkpoints", §8). The `pth_to_hf.py` export is not a substitute:
`XSamModel.to_xtuner` writes `llm/`, `visual_encoder/`, `visual_projector/`, `segmentor_encoder/` and
`segmentor_projector/` only, without the connector, the decoder, `llm_projector` or the class head.

Paths below are files of the `AAAI26_Archive` branch. Its `XSamModel.state_dict` (xsam/xsam/model/xsam.py:775-812)
drops frozen towers, so the stage-2 file holds only the two projectors; stage 1 has no LLM or SigLIP.

Layout differences handled here:
- SigLIP: the official code ran transformers 4.x, whose `SiglipVisionModel` wraps the tower in `.vision_model`;
  transformers 5 (ours) stores it flat. `visual_encoder.vision_model.X` -> `vision_encoder.model.X`.
- `segmentor.logit_scale` is a [1] Parameter (x_segmentor.py:119), as our `ClassHead.logit_scale`.
- `bg_embeds` is an `nn.Embedding(1, 256)` (xsam.py:170): its `.weight` [1, 256] is our `class_head.bg_embed`.
- The conv connector's convolutions have no bias: `ConnectorConfig(bias=False)` (configuration_connector.py:10) and
  `XSamModel` never passes `bias` (xsam.py:151-157). Our `SegConnector` convs do, so those biases are
  synthesised as zeros (the same function) and listed in `ConversionReport.synthesized`.
- The SAM encoder lives under the segmentor (`segmentor.encoder` = `SamModel.vision_encoder`, x_segmentor.py:64);
  the Mask2Former pixel decoder and transformer module are `segmentor.pixel_decoder` / `segmentor.decoder`
  (x_segmentor.py:65-66). Their inner names equal transformers' (checked against the vendored copies).

Official parameters with no counterpart:
- `segmentor.shared_image_embedding.positional_embedding` (SAM's prompt positional buffer, kept by x_segmentor.py:63
  and saved, modeling_sam.py:715) is only read on the SAM-mask-decoder path, never with the Mask2Former decoder the
  paper uses: reported in `known_unused`, not as an error.
- The "naive" region sampler (`vision_sampler`) has no parameters on the paper branch (modeling_sampler.py:184-188),
  and the decoder's input projections are identities because `feature_size == hidden_dim` (and a plain list,
  modeling_mask2former.py:2269), so neither yields keys. The connector has 3 levels only (SAM layers 12/18/24,
  xsam.py:150-158); there is no layer-6 level. Main-branch-only names (`pad_embeds`, `class_predictor.cls_bias`,
  `class_predictor.predictor.*`, `vision_encoder.*`) are reported as unmatched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor


@dataclass(frozen=True, slots=True)
class KeyRule:
    """One rename between an official key template and ours.

    Templates hold literal text and placeholders: `{n}`/`{m}` a layer index, `{param}` `weight` or `bias`,
    `{rest}` any dotted suffix. A placeholder carries its text from one side to the other unchanged.

    Attributes:
        official: template of the released key.
        ours: template of our key.
        source: the paper-branch file and line that define the official name.
    """

    official: str
    ours: str
    source: str


# Ordered; the first matching rule wins. Paths are relative to the AAAI26_Archive branch root.
RULES: tuple[KeyRule, ...] = (
    # HF CausalLM under `llm` on both sides (xsam/xsam/model/xsam.py:109): `llm.model.*`, `llm.lm_head.*`.
    KeyRule("llm.{rest}", "llm.{rest}", "xsam/xsam/model/xsam.py:109"),
    # SiglipVisionModel (transformers 4.x keeps the tower in `.vision_model`) (xsam/xsam/model/xsam.py:111).
    KeyRule("visual_encoder.vision_model.{rest}", "vision_encoder.model.{rest}", "xsam/xsam/model/xsam.py:111"),
    # DynamicProjectorModel: `.model` = Sequential(Linear, GELU, Linear)
    # (xsam/xsam/model/modules/projector/modeling_projector.py:22-28; built at xsam.py:129, 138, 147).
    KeyRule("visual_projector.model.{n}.{param}", "visual_projector.layers.{n}.{param}", "xsam/xsam/model/xsam.py:129"),
    KeyRule("llm_projector.model.{n}.{param}", "llm_projector.layers.{n}.{param}", "xsam/xsam/model/xsam.py:138"),
    KeyRule("seg_projector.model.{n}.{param}", "seg_projector.projector.layers.{n}.{param}",
            "xsam/xsam/model/xsam.py:147"),
    # ConnectorModel: `.model` = ModuleList of ConvConnectorLayer, each `.model` = Sequential(conv, LN, conv, LN,
    # conv, LN) (xsam/xsam/model/modules/connector/modeling_connector.py:50-63, 110-121; xsam.py:158).
    KeyRule("seg_connector.model.{n}.model.{m}.{param}", "seg_connector.levels.{n}.block.{m}.{param}",
            "xsam/xsam/model/modules/connector/modeling_connector.py:50"),
    # SamModel.vision_encoder kept as the segmentor's encoder (xsam/xsam/model/segmentors/x_segmentor.py:64).
    KeyRule("segmentor.encoder.{rest}", "seg_encoder.model.vision_encoder.{rest}",
            "xsam/xsam/model/segmentors/x_segmentor.py:64"),
    # Mask2FormerModel.pixel_level_module.decoder / .transformer_module (x_segmentor.py:65-66).
    KeyRule("segmentor.pixel_decoder.{rest}", "decoder.pixel_decoder.{rest}",
            "xsam/xsam/model/segmentors/x_segmentor.py:65"),
    KeyRule("segmentor.decoder.{rest}", "decoder.transformer_module.{rest}",
            "xsam/xsam/model/segmentors/x_segmentor.py:66"),
    # Open-vocabulary head: learnable temperature, a [1] Parameter (x_segmentor.py:119).
    KeyRule("segmentor.logit_scale", "class_head.logit_scale", "xsam/xsam/model/segmentors/x_segmentor.py:119"),
    # Stage-1 closed-set head: Linear(hidden, 133 + 1) (x_segmentor.py:115, `close_cls=True` in the S1 config).
    KeyRule("segmentor.class_predictor.{param}", "class_head.linear.{param}",
            "xsam/xsam/model/segmentors/x_segmentor.py:115"),
    # Background class: nn.Embedding(1, hidden) (xsam/xsam/model/xsam.py:170).
    KeyRule("bg_embeds.weight", "class_head.bg_embed", "xsam/xsam/model/xsam.py:170"),
)

# Saved on the paper branch but never read by the paper's model (see the module docstring).
KNOWN_UNUSED: tuple[str, ...] = ("segmentor.shared_image_embedding.positional_embedding",)

# Our connector convs carry a bias the paper's do not (bias=False, configuration_connector.py:10): zero is exact.
_CONNECTOR_CONV_BIAS = re.compile(r"seg_connector\.levels\.(\d+)\.block\.(\d+)\.bias")

_PLACEHOLDERS = {"n": r"\d+", "m": r"\d+", "param": "weight|bias", "rest": r".+"}


def _compile(template: str) -> re.Pattern[str]:
    """A full-match regex for `template`, one named group per placeholder."""
    parts = re.split(r"\{(\w+)\}", template)
    pattern = []
    for index, part in enumerate(parts):
        if index % 2 == 0:
            pattern.append(re.escape(part))
        elif part in _PLACEHOLDERS:
            pattern.append(f"(?P<{part}>{_PLACEHOLDERS[part]})")
        else:
            raise ValueError(f"key template {template!r}: unknown placeholder {{{part}}}")
    return re.compile("".join(pattern))


_COMPILED: tuple[tuple[KeyRule, re.Pattern[str], re.Pattern[str]], ...] = tuple(
    (rule, _compile(rule.official), _compile(rule.ours)) for rule in RULES
)


def _rule_for(key: str) -> tuple[KeyRule, str] | None:
    """The first rule whose official template matches `key`, and our key."""
    for rule, official, _ in _COMPILED:
        match = official.fullmatch(key)
        if match:
            return rule, rule.ours.format(**match.groupdict())
    return None


def official_to_ours(key: str) -> str | None:
    """Our name for a released key, or None when no rule covers it (known-unused keys included)."""
    found = _rule_for(key)
    return None if found is None else found[1]


def ours_to_official(key: str) -> str | None:
    """The released name one of our keys would have, or None when no rule covers it.

    The connector's conv biases get a name although the release has no such tensors (see `convert_official_state_dict`).
    """
    for rule, _, ours in _COMPILED:
        match = ours.fullmatch(key)
        if match:
            return rule.official.format(**match.groupdict())
    return None


@dataclass(kw_only=True, slots=True)
class ConversionReport:
    """Result of `convert_official_state_dict`. Shapes are the caller's to check (e.g. the resized vocabulary).

    Attributes:
        state: tensors under our key names, ready for `load_state_dict`.
        unmatched_official: released keys with no rule, or whose target is not one of the expected keys.
        known_unused: released keys the paper's model saves but never reads (`KNOWN_UNUSED`).
        missing: expected keys that nothing produced.
        synthesized: expected keys filled with an exact equivalent the release lacks (zero connector conv biases).
    """

    state: dict[str, Tensor]
    unmatched_official: list[str] = field(default_factory=list)
    known_unused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    synthesized: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every released key was used (or known unused) and every expected key was produced."""
        return not self.unmatched_official and not self.missing

    def summary(self, limit: int = 10) -> str:
        """One line per problem list, each showing up to `limit` keys."""
        lines = [f"{len(self.state)} tensors converted, {len(self.synthesized)} synthesized, "
                 f"{len(self.known_unused)} known unused"]
        for name, keys in (("unmatched official keys", self.unmatched_official), ("missing keys", self.missing)):
            if keys:
                more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
                lines.append(f"{len(keys)} {name}: {keys[:limit]}{more}")
        return "\n".join(lines)


def convert_official_state_dict(state: Mapping[str, Tensor], expected_keys: Collection[str]) -> ConversionReport:
    """Rename a released X-SAM state dict onto our module names (see `RULES`).

    Args:
        state: released tensors under their official names (`read_official_dir`).
        expected_keys: our model's `state_dict()` keys, or the subset this checkpoint should fill (a stage-2 file
            holds only the two projectors).

    Returns:
        The renamed tensors and what did not line up; nothing is raised for unmatched or missing keys.
    """
    expected = set(expected_keys)
    report = ConversionReport(state={})
    for key, tensor in state.items():
        if key in KNOWN_UNUSED:
            report.known_unused.append(key)
            continue
        found = _rule_for(key)
        if found is None or found[1] not in expected:
            report.unmatched_official.append(key)
            continue
        _, target = found
        report.state[target] = tensor
    for key in sorted(expected - report.state.keys()):
        match = _CONNECTOR_CONV_BIAS.fullmatch(key)
        weight = report.state.get(key[: -len("bias")] + "weight") if match else None
        if weight is not None and weight.dim() == 4:
            report.state[key] = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            report.synthesized.append(key)
        else:
            report.missing.append(key)
    return report


_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_BIN = "pytorch_model.bin"
_EXPECTED_FILES = f"{_SINGLE}, {_INDEX} with its model-0000x-of-0000y.safetensors shards, or {_BIN}"


def _read_sharded(directory: Path) -> dict[str, Tensor]:
    """Shards named by `model.safetensors.index.json`; every indexed key must be found in its shard."""
    index_path = directory / _INDEX
    weight_map = json.loads(index_path.read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: no 'weight_map' object mapping tensor names to shard files")
    state: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = directory / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{index_path} names shard {shard!r}, which is not in {directory}")
        for key, tensor in load_file(shard_path, device="cpu").items():
            if key in state:
                raise ValueError(f"{directory}: tensor {key!r} appears in more than one shard")
            state[key] = tensor
    absent = sorted(weight_map.keys() - state.keys())
    unindexed = sorted(state.keys() - weight_map.keys())
    if absent or unindexed:
        raise ValueError(f"{index_path} disagrees with its shards: indexed but absent {absent[:5]}, "
                         f"present but not indexed {unindexed[:5]}")
    return state


def _read_bin(path: Path) -> dict[str, Tensor]:
    """A flat `torch.save`d state dict, tensors only (`weights_only=True`, never pickle)."""
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except RuntimeError:
        # mmap needs the zip format; files from legacy `torch.save` fall back to a plain read.
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    for wrapper in ("state_dict", "module"):
        if isinstance(loaded, dict) and set(loaded) == {wrapper}:
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"{path}: expected a flat dict of tensors (a module state dict)")
    return dict(loaded)


def read_official_dir(path: str | Path) -> dict[str, Tensor]:
    """Read released X-SAM tensors from a local directory, on CPU.

    Looks for, in order: `model.safetensors.index.json` with its shards, `model.safetensors`, `pytorch_model.bin`
    (the release's format, read with `weights_only=True`).

    Raises:
        FileNotFoundError: the directory or a shard is absent, or none of the files above is there.
        ValueError: the index and its shards disagree, or the .bin is not a flat dict of tensors.
    """
    directory = Path(path)
    if directory.is_file():
        raise FileNotFoundError(f"{directory} is a file: pass the directory holding it (expected "
                                f"{_EXPECTED_FILES})")
    if not directory.is_dir():
        raise FileNotFoundError(f"X-SAM checkpoint directory not found: {directory} (expected it to hold "
                                f"{_EXPECTED_FILES})")
    if (directory / _INDEX).is_file():
        return _read_sharded(directory)
    if (directory / _SINGLE).is_file():
        return load_file(directory / _SINGLE, device="cpu")
    if (directory / _BIN).is_file():
        return _read_bin(directory / _BIN)
    present = sorted(p.name for p in directory.iterdir())
    hint = ""
    if any(name.startswith("model-") and name.endswith(".safetensors") for name in present):
        hint = f"; safetensors shards are present but {_INDEX} is missing"
    elif {"llm", "segmentor_encoder"} <= set(present):
        hint = ("; this looks like the official pth_to_hf.py export, which omits the connector, decoder and class "
                f"head: use the stage directory's {_BIN} instead")
    raise FileNotFoundError(f"no X-SAM weights in {directory}: expected {_EXPECTED_FILES}; found {present[:10]}"
                            f"{hint}")
