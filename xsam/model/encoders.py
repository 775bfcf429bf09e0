"""The two image encoders of X-SAM (spec §3 "Encoders and projectors", §8 rows "SAM layers /
connector" and "seg_projector").

- `VisionEncoder`: SigLIP2-so400m-patch14-384 (HF `SiglipVisionModel`; the fixed-resolution SigLIP2
  checkpoints use the SigLIP architecture). X-SAM feeds the LLM the penultimate hidden state
  (`visual_select_layer=-2`) with every token kept (`visual_select_indx=0`, SigLIP has no CLS):
  27x27 = 729 tokens of width 1152 at 384 px.
- `SegEncoder`: SAM ViT-L (HF `SamVisionModel`), 64x64 grid of width 1024 at 1024 px. Its
  penultimate hidden state feeds `SegTokenProjector` (dual-encoder path, `visual_select_layer=-2`)
  and hidden states 12/18/24 feed `SegConnector` (`seg_select_layers=[6, 12, 18, 24]`, last 3 used).

Hidden-state indexing follows HF's `output_hidden_states=True` tuple, which is what X-SAM indexes
(`seg_visual_outputs.hidden_states[i] for i in self.seg_select_layers` and
`hidden_states[self.visual_select_layer]` in `xsam/xsam/model/xsam.py`): `num_hidden_layers + 1`
states, `hidden_states[0]` the patch embedding (plus position embedding), `hidden_states[i]` the
output of transformer block i (1-based), before SigLIP's `post_layernorm` and before SAM's neck.
So SAM's layer 24 is the last block's output and "penultimate" (-2) is block 23's output; SigLIP's
-2 is the output of block 26 of 27.

Both encoders return SAM states channels-last, [B, H, W, C], as `SegConnector` and
`SegTokenProjector` (`xsam.model.connector`) expect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from torch import Tensor, nn
from transformers import SamVisionConfig, SamVisionModel, SiglipVisionConfig, SiglipVisionModel
from transformers.modeling_utils import PreTrainedModel

_Model = TypeVar("_Model", bound=PreTrainedModel)


def _load_local(model_class: type[_Model], path: str | Path) -> _Model:
    """`model_class.from_pretrained` on a local directory, never the Hub.

    The directory may hold the bare vision model or the full two-tower / promptable model
    (`SiglipModel`: `vision_model.*` keys; `SamModel`: `vision_encoder.*` keys): transformers reads
    the vision sub-config and strips/keeps the prefix itself; the other towers' weights are reported
    as unexpected and dropped. A missing vision weight is an error rather than a silent random init.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"{model_class.__name__} checkpoint directory not found: {directory}")
    model, loading_info = model_class.from_pretrained(directory, local_files_only=True, output_loading_info=True)
    missing = sorted(loading_info["missing_keys"])
    if missing:
        raise ValueError(f"{model_class.__name__} weights missing from {directory}: {missing}")
    return model


class VisionEncoder(nn.Module):
    """SigLIP vision tower returning the hidden state X-SAM projects into the LLM (spec §3).

    Args:
        model: the HF `SiglipVisionModel`.
        select_layer: index into HF's `hidden_states` tuple (`visual_select_layer`, -2 in X-SAM).
    """

    def __init__(self, model: SiglipVisionModel, select_layer: int = -2) -> None:
        super().__init__()
        num_states = model.config.num_hidden_layers + 1
        if not -num_states <= select_layer < num_states:
            raise ValueError(f"select_layer {select_layer} out of range for {num_states} hidden states")
        self.model = model
        self.select_layer = select_layer

    @classmethod
    def from_config(cls, config: SiglipVisionConfig, select_layer: int = -2) -> VisionEncoder:
        """Randomly initialised tower (tests, or before loading a flat X-SAM state dict)."""
        return cls(SiglipVisionModel(config), select_layer=select_layer)

    @classmethod
    def from_pretrained(cls, path: str | Path, select_layer: int = -2) -> VisionEncoder:
        """Vision tower from a local `SiglipVisionModel` or full `SiglipModel` directory."""
        return cls(_load_local(SiglipVisionModel, path), select_layer=select_layer)

    @property
    def hidden_size(self) -> int:
        """Token width (1152 for so400m): `visual_projector`'s input width."""
        return self.model.config.hidden_size

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters that never reach the selected hidden state: the blocks after it, the
        post-layernorm and the pooling head. Training freezes them (they would get no gradient,
        which data-parallel wrappers treat as an error); they stay in the state dict so
        checkpoints load unchanged."""
        layers = self.model.config.num_hidden_layers
        first_unused = self.select_layer % (layers + 1)  # hidden_states[i] is block i's output
        vision = getattr(self.model, "vision_model", self.model)  # transformers 5 flattened the wrapper
        unused = [p for layer in vision.encoder.layers[first_unused:] for p in layer.parameters()]
        unused += list(vision.post_layernorm.parameters())
        if getattr(vision, "head", None) is not None:
            unused += list(vision.head.parameters())
        return unused

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values [B, 3, V, V] -> tokens [B, (V/patch)², C] (729 x 1152 at 384 px for so400m)."""
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return outputs.hidden_states[self.select_layer]


@dataclass
class SegEncoderOutput:
    """SAM hidden states selected for X-SAM, all channels-last [B, H, W, C].

    Attributes:
        tokens_state: the penultimate hidden state, input of `SegTokenProjector` (dual encoder).
        pyramid_states: hidden states at `SegEncoder.select_layers`, input of `SegConnector`.
    """

    tokens_state: Tensor
    pyramid_states: list[Tensor]


class SegEncoder(nn.Module):
    """SAM image encoder returning the hidden states X-SAM's dual-encoder path and connector use.

    Args:
        model: the HF `SamVisionModel`.
        select_layers: indices into HF's `hidden_states` tuple for the connector, i.e. 1-based block
            numbers (0 would be the patch embedding). Default (12, 18, 24): the last 3 of X-SAM's
            `seg_select_layers=[6, 12, 18, 24]` (spec §3: the decoder has 3 levels).
    """

    def __init__(self, model: SamVisionModel, select_layers: Sequence[int] = (12, 18, 24)) -> None:
        super().__init__()
        num_layers = model.config.num_hidden_layers
        if not select_layers or any(not 1 <= layer <= num_layers for layer in select_layers):
            raise ValueError(f"select_layers {tuple(select_layers)} must be block numbers in 1..{num_layers}")
        if num_layers < 2:
            raise ValueError("SegEncoder needs at least 2 blocks for a penultimate hidden state")
        self.model = model
        self.select_layers = tuple(select_layers)

    @classmethod
    def from_config(cls, config: SamVisionConfig, select_layers: Sequence[int] = (12, 18, 24)) -> SegEncoder:
        """Randomly initialised encoder (tests, or before loading a flat X-SAM state dict)."""
        return cls(SamVisionModel(config), select_layers=select_layers)

    @classmethod
    def from_pretrained(cls, path: str | Path, select_layers: Sequence[int] = (12, 18, 24)) -> SegEncoder:
        """Image encoder from a local `SamVisionModel` or full `SamModel` directory."""
        return cls(_load_local(SamVisionModel, path), select_layers=select_layers)

    @property
    def hidden_size(self) -> int:
        """Channel width of the hidden states (1024 for ViT-L)."""
        return self.model.config.hidden_size

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters X-SAM never reads: SAM's neck (and any block after the last selected layer).
        Frozen in training, kept in the state dict (see `VisionEncoder.unused_parameters`)."""
        last = max(max(self.select_layers), self.model.config.num_hidden_layers - 1)
        sam = self.model.vision_encoder
        unused = [p for layer in sam.layers[last:] for p in layer.parameters()]
        return unused + list(sam.neck.parameters())

    def forward(self, pixel_values: Tensor) -> SegEncoderOutput:
        """pixel_values [B, 3, S, S] -> states [B, S/16, S/16, C] (64x64x1024 at 1024 px for ViT-L)."""
        hidden_states = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        return SegEncoderOutput(
            tokens_state=hidden_states[-2],
            pyramid_states=[hidden_states[layer] for layer in self.select_layers],
        )
