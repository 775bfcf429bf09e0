"""X-SAM mask decoder and class heads (spec §3 "Mask decoder", "Bridging LLM -> decoder", "Class counts"; §8).

The decoder is Mask2Former (Cheng et al., CVPR 2022) without a backbone: transformers' deformable-attention
`Mask2FormerPixelDecoder` runs on the segmentation connector's 3-level pyramid (512@s8, 1024@s16, 2048@s32), and the
masked-attention decoder of `Mask2FormerTransformerModule` predicts one mask per learned query. X-SAM adds the
projected `<SEG>` embedding to every learned query feature before the decoder (§3 Bridging 4), which needs our own
copy of the module's ~15-line forward (`MaskDecoder._decode`). Each decoder *instance* may be a repeat of one image's
features: the paper branch runs one instance per refseg/reaseg `<SEG>` (§8 "refseg/reaseg <SEG> use in the decoder").

Classes are scored by `ClassHead`, a cosine similarity against the LLM's condition embeddings plus a learned
background (§3 Bridging 5-6, §8 "Class head"), or by `LinearClassHead` in stage 1 (§3 "Class counts").
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerMaskedAttentionDecoderLayer,
    Mask2FormerPixelDecoder,
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    Mask2FormerPredictionBlock,
    Mask2FormerTransformerModule,
)

from xsam.model.deformable import Backend, install_backend

# Mask2Former hard-codes 3 feature levels in both the pixel decoder and the transformer module.
NUM_FEATURE_LEVELS = 3


def decoder_config(**overrides: Any) -> Mask2FormerConfig:
    """The paper's decoder config (spec §3 "Mask decoder", §8 "Decoder"), built offline.

    X-SAM reads `facebook/mask2former-swin-large-coco-panoptic` and re-initialises the weights; these are the values
    of that config which the decoder uses. `feature_strides` keeps the Swin-style [4, 8, 16, 32] and `common_stride`
    is 4, so the pixel decoder adds one FPN lateral level on the first (stride-8) input and the masks come out at
    stride 8 (128x128 for a 1024 input). `decoder_layers=10` is the HF convention: 9 masked-attention layers plus the
    prediction from the raw queries, i.e. 10 mask predictions. `num_queries=200` is *unverified* (§8 "num_queries").

    Args:
        **overrides: any `Mask2FormerConfig` field, e.g. a tiny test decoder (hidden 32, 2 encoder layers, 3 decoder
            layers, 20 queries). `feature_size`, `mask_feature_size` and `hidden_dim` must be multiples of 32
            because the pixel decoder uses GroupNorm(32).
    """
    values: dict[str, Any] = {
        "feature_size": 256,
        "mask_feature_size": 256,
        "hidden_dim": 256,
        "encoder_layers": 6,
        "encoder_feedforward_dim": 1024,
        "decoder_layers": 10,
        "num_attention_heads": 8,
        "dim_feedforward": 2048,
        "dropout": 0.0,
        "pre_norm": False,
        "enforce_input_projection": False,
        "num_queries": 200,
        "feature_strides": [4, 8, 16, 32],
        "common_stride": 4,
    }
    values.update(overrides)
    for key in ("feature_size", "mask_feature_size", "hidden_dim"):
        if values[key] % 32 != 0:
            raise ValueError(f"decoder_config: {key}={values[key]} must be a multiple of 32 (GroupNorm(32) groups)")
    return Mask2FormerConfig(**values)


@dataclass(kw_only=True)  # no slots: DeepSpeed ZeRO-3's post-forward hook reads module outputs with vars()
class MaskDecoderOutput:
    """Per-layer decoder predictions, auxiliary layers first and the final layer last (spec §3 "Mask decoder").

    Attributes:
        query_embeddings: `config.decoder_layers` tensors [N, Q, hidden], layer-normed query states fed to the class
            head.
        mask_logits: `config.decoder_layers` tensors [N, Q, H/8, W/8], <query, mask feature> logits.
    """

    query_embeddings: tuple[Tensor, ...]
    mask_logits: tuple[Tensor, ...]


def _init_weights(module: nn.Module, *, init_std: float, init_xavier_std: float) -> None:
    """Mask2Former's re-initialisation (`Mask2FormerPreTrainedModel._init_weights`, used by X-SAM's `_from_config`).

    Applied with `nn.Module.apply`, which visits children before parents, so the parent rules (deformable attention,
    decoder layer) override the generic Linear rule on their children, as in transformers.
    """
    if isinstance(module, Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
        # Deformable DETR: offsets start on a ring of directions, one per head, growing with the point index.
        nn.init.constant_(module.sampling_offsets.weight, 0.0)
        thetas = torch.arange(module.n_heads, dtype=torch.float32) * (2.0 * math.pi / module.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(module.n_heads, 1, 1, 2)
        grid = grid.repeat(1, module.n_levels, module.n_points, 1)
        grid = grid * torch.arange(1, module.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            module.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(module.attention_weights.weight, 0.0)
        nn.init.constant_(module.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(module.value_proj.weight)
        nn.init.constant_(module.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(module.output_proj.weight)
        nn.init.constant_(module.output_proj.bias, 0.0)
    elif isinstance(module, Mask2FormerMaskedAttentionDecoderLayer):
        for param in module.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param, gain=init_xavier_std)
        nn.init.zeros_(module.cross_attn.in_proj_bias)
    elif isinstance(module, Mask2FormerTransformerModule):
        for projection in module.input_projections:
            if isinstance(projection, nn.Conv2d):
                nn.init.xavier_uniform_(projection.weight, gain=init_xavier_std)
                nn.init.constant_(projection.bias, 0.0)
    elif isinstance(module, Mask2FormerPixelDecoder):
        # `level_embed` is created with torch.Tensor(...) (uninitialised memory) and must be filled here.
        nn.init.normal_(module.level_embed, std=1.0)
    elif isinstance(module, Mask2FormerPredictionBlock):
        # The mask MLP keeps PyTorch's default Linear init, as in the original Mask2Former.
        for submodule in module.modules():
            if isinstance(submodule, nn.Linear):
                submodule.reset_parameters()
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=1.0)
    elif isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, mean=0.0, std=init_std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MaskDecoder(nn.Module):
    """Mask2Former pixel decoder + masked-attention transformer decoder with `<SEG>` conditioning (spec §3).

    Parameter names follow transformers (`pixel_decoder.*`, `transformer_module.*`) so that HF Mask2Former weights
    map onto them one to one.
    """

    def __init__(
        self,
        *,
        config: Mask2FormerConfig,
        feature_channels: Sequence[int] = (512, 1024, 2048),
        deformable_backend: Backend = "auto",
    ) -> None:
        """Build the decoder with freshly initialised weights (spec §3: X-SAM re-initialises the M2F checkpoint).

        Args:
            config: decoder hyper-parameters, normally from `decoder_config`.
            feature_channels: channels of the connector pyramid, high resolution (stride 8) first; the defaults are
                the conv connector's 512@128², 1024@64², 2048@32² for a 1024 input (spec §3 "Segmentation
                connector").
            deformable_backend: multi-scale deformable attention of the pixel decoder, see
                `xsam.model.deformable.resolve_backend`: "auto" runs the compiled kernel for CUDA tensors when it is
                in the local cache and pure PyTorch otherwise; "torch" always PyTorch; "kernel" requires the kernel.
        """
        super().__init__()
        if len(feature_channels) != NUM_FEATURE_LEVELS:
            raise ValueError(
                f"MaskDecoder: feature_channels={tuple(feature_channels)} must have {NUM_FEATURE_LEVELS} levels "
                "(Mask2Former's pixel decoder is fixed at 3)"
            )
        self.config = config
        self.feature_channels = tuple(feature_channels)
        self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=list(feature_channels))
        self.transformer_module = Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        # transformers makes `level_embed` with the legacy `torch.Tensor(...)` constructor, which ignores
        # a `torch.device(...)` context: put it where every other parameter is (the meta device for a summary)
        embed = self.pixel_decoder.level_embed
        device = self.pixel_decoder.input_projections[0][0].weight.device
        if embed.device != device:
            self.pixel_decoder.level_embed = nn.Parameter(torch.empty(embed.shape, dtype=embed.dtype, device=device))
        self.apply(partial(_init_weights, init_std=config.init_std, init_xavier_std=config.init_xavier_std))
        # --- deformable attention backend (xsam.model.deformable): same parameters, per-instance forward ---
        install_backend(self.pixel_decoder, deformable_backend)

    def forward(
        self,
        features: Sequence[Tensor],
        *,
        seg_embeddings: Tensor | None = None,
        batch_index: Tensor | None = None,
    ) -> MaskDecoderOutput:
        """Predict masks for N decoder instances from B images.

        Args:
            features: connector pyramid, 3 NCHW maps [B, C_i, H/s, W/s] at strides 8, 16, 32, high resolution first.
            seg_embeddings: optional [N, hidden] projected `<SEG>` embeddings, one per instance, added to every
                learned query feature before the transformer decoder (spec §3 Bridging 4).
            batch_index: optional [N] long tensor, the image of each instance. The pixel decoder runs once per image
                and its outputs are repeated per instance, which equals repeating the image features as the paper
                branch does for refseg/reaseg (§8). Default: one instance per image (N = B).

        Returns:
            Per-layer query embeddings [N, Q, hidden] and mask logits [N, Q, H/8, W/8].
        """
        self._check_inputs(features=features, seg_embeddings=seg_embeddings, batch_index=batch_index)
        pixel_output = self.pixel_decoder(list(features), output_attentions=False, output_hidden_states=False)
        multi_scale_features = list(pixel_output.multi_scale_features)
        mask_features = pixel_output.mask_features
        if batch_index is not None:
            multi_scale_features = [feature[batch_index] for feature in multi_scale_features]
            mask_features = mask_features[batch_index]
        return self._decode(
            multi_scale_features=multi_scale_features, mask_features=mask_features, seg_embeddings=seg_embeddings
        )

    def _decode(
        self, *, multi_scale_features: list[Tensor], mask_features: Tensor, seg_embeddings: Tensor | None
    ) -> MaskDecoderOutput:
        """`Mask2FormerTransformerModule.forward` (transformers 5.x) with the `<SEG>` addition (spec §3 Bridging 4)."""
        module = self.transformer_module
        stage_features: list[Tensor] = []
        stage_positions: list[Tensor] = []
        sizes: list[torch.Size] = []
        for level in range(NUM_FEATURE_LEVELS):
            feature = multi_scale_features[level]
            sizes.append(feature.shape[-2:])
            position = module.position_embedder(feature.shape, feature.device, feature.dtype, None).flatten(2)
            projected = module.input_projections[level](feature).flatten(2)
            projected = projected + module.level_embed.weight[level][None, :, None]
            # NCHW -> HW x N x C, the sequence-first layout of the decoder layers.
            stage_positions.append(position.permute(2, 0, 1))
            stage_features.append(projected.permute(2, 0, 1))

        batch_size = mask_features.shape[0]
        query_positions = module.queries_embedder.weight.unsqueeze(1).repeat(1, batch_size, 1)
        query_features = module.queries_features.weight.unsqueeze(1).repeat(1, batch_size, 1)
        if seg_embeddings is not None:
            query_features = query_features + seg_embeddings.to(query_features.dtype).unsqueeze(0)

        decoder_output = module.decoder(
            inputs_embeds=query_features,
            multi_stage_positional_embeddings=stage_positions,
            pixel_embeddings=mask_features,
            encoder_hidden_states=stage_features,
            query_position_embeddings=query_positions,
            feature_size_list=sizes,
            output_hidden_states=False,
            output_attentions=False,
            return_dict=True,
        )
        return MaskDecoderOutput(
            query_embeddings=tuple(state.transpose(0, 1) for state in decoder_output.intermediate_hidden_states),
            mask_logits=tuple(decoder_output.masks_queries_logits),
        )

    def _check_inputs(
        self, *, features: Sequence[Tensor], seg_embeddings: Tensor | None, batch_index: Tensor | None
    ) -> None:
        """Reject pyramids and instance tensors that would fail deep inside transformers with an unclear error."""
        if len(features) != NUM_FEATURE_LEVELS:
            raise ValueError(f"MaskDecoder: got {len(features)} feature maps, need {NUM_FEATURE_LEVELS} (s8, s16, s32)")
        channels = tuple(feature.shape[1] for feature in features)
        if channels != self.feature_channels:
            raise ValueError(
                f"MaskDecoder: feature channels {channels} differ from feature_channels={self.feature_channels}; "
                "pass the connector pyramid high resolution first"
            )
        num_images = features[0].shape[0]
        if batch_index is not None:
            if batch_index.dim() != 1 or batch_index.dtype != torch.long:
                raise ValueError(
                    f"MaskDecoder: batch_index must be a 1-D long tensor, got {batch_index.dtype} "
                    f"{tuple(batch_index.shape)}"
                )
            if batch_index.numel() > 0 and (batch_index.min() < 0 or batch_index.max() >= num_images):
                raise ValueError(f"MaskDecoder: batch_index values must lie in [0, {num_images}), got {batch_index}")
        num_instances = num_images if batch_index is None else batch_index.shape[0]
        if seg_embeddings is not None and tuple(seg_embeddings.shape) != (num_instances, self.config.hidden_dim):
            raise ValueError(
                f"MaskDecoder: seg_embeddings has shape {tuple(seg_embeddings.shape)}, expected "
                f"({num_instances}, {self.config.hidden_dim}): one projected <SEG> per decoder instance"
            )


class ClassHead(nn.Module):
    """Cosine-similarity classifier over condition embeddings plus a learned background (spec §3 Bridging 5-6).

    logit(q, k) = exp(tau) * cos(q_out, c_k) with tau learnable (`logit_scale`, the archive's parameter name, §8),
    initialised at ln(1/0.07). The background embedding `bg_embed` is appended as the last class (no-object).
    """

    def __init__(self, *, hidden_dim: int, clamp: float = 500.0, pad_logit: float = -1e9) -> None:
        """
        Args:
            hidden_dim: width of query and condition embeddings (256 in the paper).
            clamp: logits are clamped to [-clamp, clamp]; 500 on the paper branch, 50 on main (§8 "Class head").
            pad_logit: logit given to padded conditions after clamping; -1e9 on the paper branch, -1e6 on main.
        """
        super().__init__()
        if clamp <= 0:
            raise ValueError(f"ClassHead: clamp={clamp} must be positive")
        self.clamp = clamp
        self.pad_logit = pad_logit
        # shape [1] as the paper branch's `segmentor.logit_scale` (and DeepSpeed cannot broadcast 0-d parameters)
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1.0 / 0.07)]))
        self.bg_embed = nn.Parameter(torch.randn(1, hidden_dim))

    def forward(self, query_embeddings: Tensor, condition_embeddings: Tensor, condition_mask: Tensor) -> Tensor:
        """Score every query against the conditions and the background.

        Args:
            query_embeddings: [N, Q, hidden] decoder query states (one layer of `MaskDecoderOutput`).
            condition_embeddings: [N, K, hidden] condition embeddings c_k (§3 Bridging 2). For refseg/reaseg the
                batch's conditions are shared by all instances (§3 Bridging 7): expand one [K, hidden] to
                [N, K, hidden].
            condition_mask: [N, K] bool, True for real conditions and False for padding.

        Returns:
            [N, Q, K + 1] logits; column K is the background.
        """
        num_instances, num_conditions = condition_embeddings.shape[:2]
        if query_embeddings.shape[0] != num_instances or query_embeddings.shape[-1] != condition_embeddings.shape[-1]:
            raise ValueError(
                f"ClassHead: query_embeddings {tuple(query_embeddings.shape)} and condition_embeddings "
                f"{tuple(condition_embeddings.shape)} must share N and hidden"
            )
        if tuple(condition_mask.shape) != (num_instances, num_conditions) or condition_mask.dtype != torch.bool:
            raise ValueError(
                f"ClassHead: condition_mask must be bool [{num_instances}, {num_conditions}], got "
                f"{condition_mask.dtype} {tuple(condition_mask.shape)}"
            )
        background = self.bg_embed.to(condition_embeddings.dtype).expand(num_instances, 1, -1)
        classes = torch.cat([condition_embeddings, background], dim=1)
        cosine = torch.einsum(
            "nqd,nkd->nqk",
            nn.functional.normalize(query_embeddings, dim=-1),
            nn.functional.normalize(classes, dim=-1),
        )
        logits = (self.logit_scale.exp() * cosine).clamp(min=-self.clamp, max=self.clamp)
        valid = torch.cat([condition_mask, condition_mask.new_ones(num_instances, 1)], dim=1)
        return logits.masked_fill(~valid[:, None, :], self.pad_logit)


class LinearClassHead(nn.Module):
    """Stage-1 closed-set classifier: Linear(hidden, num_classes + 1); the last class is no-object.

    Spec §3 "Class counts": stage 1 uses 133 COCO panoptic classes + 1.
    """

    def __init__(self, *, hidden_dim: int, num_classes: int = 133) -> None:
        """
        Args:
            hidden_dim: width of the decoder query states.
            num_classes: COCO panoptic categories (133); one no-object logit is added.
        """
        super().__init__()
        self.linear = nn.Linear(hidden_dim, num_classes + 1)

    def forward(self, query_embeddings: Tensor) -> Tensor:
        """[N, Q, hidden] -> [N, Q, num_classes + 1] logits."""
        return self.linear(query_embeddings)
