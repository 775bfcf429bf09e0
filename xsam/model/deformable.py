"""Multi-scale deformable attention for the Mask2Former pixel decoder: a pure-PyTorch path and a compiled fast path.

Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021, eq. 3) lets each query read
`n_points` bilinear samples per level and head from the flattened feature pyramid and mixes them with softmaxed
weights. transformers' `Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention.forward` always calls its
module-level grid_sample implementation (`modeling_mask2former.multi_scale_deformable_attention`). Here:

- `ms_deform_attn_torch` is our pure-PyTorch implementation (one `grid_sample` per level), the CPU path and the
  reference. It performs the same operations in the same order as transformers' function (bit-identical outputs
  on CPU in tests/xsam/model/test_deformable.py), so installing it changes no output.
- The fast path is the CUDA kernel that transformers itself maps `MultiScaleDeformableAttention` to
  (`transformers/integrations/hub_kernels.py`: `LayerRepository(repo_id="kernels-community/deformable-detr",
  layer_name="MultiScaleDeformableAttention", version=1)`, applied by `kernels.kernelize`). It is looked up only in
  the local Hugging Face cache, with the Hub forced offline: nothing is ever downloaded.
- `install_backend` makes every deformable attention inside a module call a `DeformableAttention` dispatcher, which
  runs the kernel for CUDA tensors of a supported dtype and the torch path otherwise. It switches each attention
  *instance* to `DispatchingDeformableAttention`, a subclass whose forward is transformers' forward calling the
  dispatcher; the transformers module and other models in the process are untouched, and parameter names and
  state-dict keys are unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
)

logger = logging.getLogger("xsam.model.deformable")

Backend = Literal["auto", "torch", "kernel"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "kernel")

KERNEL_REPO_ID = "kernels-community/deformable-detr"
KERNEL_VERSION = 1
# The kernel dispatches on AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16) (ms_deform_attn_cuda.cu).
KERNEL_DTYPES = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
KERNEL_HOWTO = (
    "`pip install kernels`, then pre-fetch the kernel into the Hugging Face cache on a machine with network "
    f"(`python -c \"from kernels import get_kernel; get_kernel('{KERNEL_REPO_ID}', version={KERNEL_VERSION})\"`, "
    "with the same torch/CUDA build as here) and copy that cache (HF_HUB_CACHE or KERNELS_CACHE) to this machine"
)


class KernelAttention(Protocol):
    """The call contract of the hub layer `MultiScaleDeformableAttention` (transformers 5.x, `kernels` layers).

    `value` [B, S, heads, head_dim], `value_spatial_shapes` long [L, 2] (height, width) on the value's device, the same
    shapes as a list, `level_start_index` long [L], `sampling_locations` [B, Q, heads, L, P, 2] in [0, 1] (x, y),
    `attention_weights` [B, Q, heads, L, P], `im2col_step` the batch chunk, which must divide B. Returns
    [B, Q, heads * head_dim] and is differentiable.
    """

    def __call__(
        self,
        value: Tensor,
        value_spatial_shapes: Tensor,
        value_spatial_shapes_list: list[tuple[int, int]],
        level_start_index: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        im2col_step: int,
    ) -> Tensor: ...


def ms_deform_attn_torch(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with one `grid_sample` per level (Deformable DETR eq. 3), CPU or GPU.

    Same semantics as transformers' `multi_scale_deformable_attention`: bilinear sampling with zero padding outside
    the map, pixel centres at (i + 0.5) / size (`align_corners=False`), and the level-major sum over levels x points.

    Args:
        value: [B, S, heads, head_dim], the projected keys of all levels, flattened high resolution first;
            S = sum of height * width.
        spatial_shapes: (height, width) per level, a list (preferred: no device sync) or a long [L, 2] tensor.
        sampling_locations: [B, Q, heads, L, P, 2] normalised (x, y) locations, 0 and 1 being the map's outer edges.
        attention_weights: [B, Q, heads, L, P], normally softmaxed over L x P.

    Returns:
        [B, Q, heads * head_dim], the heads concatenated.
    """
    pairs = spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else spatial_shapes
    shapes = [(int(height), int(width)) for height, width in pairs]
    batch, num_keys, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if len(shapes) != num_levels or sum(height * width for height, width in shapes) != num_keys:
        raise ValueError(
            f"ms_deform_attn_torch: spatial_shapes {shapes} do not match value {tuple(value.shape)} and "
            f"sampling_locations {tuple(sampling_locations.shape)}: need {num_levels} levels summing to {num_keys} keys"
        )
    expected_weights = (batch, num_queries, num_heads, num_levels, num_points)
    if tuple(attention_weights.shape) != expected_weights:
        raise ValueError(
            f"ms_deform_attn_torch: attention_weights has shape {tuple(attention_weights.shape)}, expected "
            f"{expected_weights} from sampling_locations {tuple(sampling_locations.shape)}"
        )

    # grid_sample reads (x, y) in [-1, 1]; heads fold into its batch dimension so each head samples its own map.
    grids = 2 * sampling_locations - 1
    samples: list[Tensor] = []
    start = 0
    for level, (height, width) in enumerate(shapes):
        # [B, HW, heads, D] -> [B, heads, D, HW] -> [B * heads, D, H, W]
        level_value = value[:, start : start + height * width].permute(0, 2, 3, 1)
        level_maps = level_value.reshape(batch * num_heads, head_dim, height, width)
        start += height * width
        # [B, Q, heads, P, 2] -> [B * heads, Q, P, 2]: Q x P output "pixels" per head
        level_grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * num_heads, num_queries, num_points, 2)
        samples.append(
            nn.functional.grid_sample(
                level_maps, level_grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        )  # [B * heads, D, Q, P]
    # Concatenating along the point axis gives the level-major L x P order of the weights (and of transformers' sum).
    sampled = torch.cat(samples, dim=-1)  # [B * heads, D, Q, L * P]
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_levels * num_points)
    mixed = (sampled * weights).sum(-1)  # [B * heads, D, Q]
    return mixed.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


def is_cuda_tensor(value: Tensor) -> bool:
    """The device half of the kernel predicate: the compiled kernel only has a CUDA implementation."""
    return value.is_cuda


def _im2col_step(batch: int, cap: int) -> int:
    """The largest batch chunk <= `cap` that divides `batch` (the kernel rejects a chunk that does not)."""
    for step in range(min(batch, cap), 0, -1):
        if batch % step == 0:
            return step
    return 1


_HUB_KERNEL = "kernels-community/deformable-detr (reload)"


class DeformableAttention:
    """Per-call dispatch between the compiled kernel and `ms_deform_attn_torch`.

    The kernel runs when one is given, `on_device(value)` holds (the real predicate is `is_cuda_tensor`) and value,
    sampling locations and attention weights all have a dtype in `KERNEL_DTYPES`; otherwise the torch path runs, so a
    model resolved to "kernel" still works on CPU. Not an `nn.Module`: it adds no parameters or state-dict keys.
    """

    def __init__(self, *, kernel: KernelAttention | None, on_device: Callable[[Tensor], bool] = is_cuda_tensor) -> None:
        """
        Args:
            kernel: the hub layer (see `KernelAttention`), or None for the torch path only.
            on_device: whether a value tensor lives where the kernel runs. Tests inject a stand-in to exercise the
                kernel branch without a GPU; production code keeps `is_cuda_tensor`.
        """
        self.kernel = kernel
        self.on_device = on_device

    def __getstate__(self) -> dict[str, Any]:
        # The hub layer's class lives in a module that `kernels` imports from a cache path, which pickle cannot name
        # in another process: send a marker instead and look the kernel up again where the copy is loaded.
        state = dict(self.__dict__)
        if self.kernel is not None and self.kernel is find_kernel()[0]:
            state["kernel"] = _HUB_KERNEL
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["kernel"], str) and state["kernel"] == _HUB_KERNEL:
            state["kernel"] = resolve_backend("auto").kernel
        self.__dict__.update(state)

    def uses_kernel(self, value: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> bool:
        """Whether `__call__` would run the compiled kernel on these tensors."""
        return (
            self.kernel is not None
            and self.on_device(value)
            and all(tensor.dtype in KERNEL_DTYPES for tensor in (value, sampling_locations, attention_weights))
        )

    def __call__(
        self,
        value: Tensor,
        spatial_shapes_list: list[tuple[int, int]],
        level_start_index: Tensor | None,
        sampling_locations: Tensor,
        attention_weights: Tensor,
        *,
        im2col_step: int = 128,
    ) -> Tensor:
        """Attend; arguments as in `ms_deform_attn_torch`, plus the pixel decoder's `level_start_index` (long [L])."""
        kernel = self.kernel
        if kernel is None or not self.uses_kernel(value, sampling_locations, attention_weights):
            return ms_deform_attn_torch(value, spatial_shapes_list, sampling_locations, attention_weights)
        # The kernel reads all three float inputs as one scalar type and needs contiguous memory. Under autocast they
        # differ (the projections give half precision, softmax float32): run in the widest, as the torch path's
        # type promotion does, rather than round the weights.
        dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
        spatial_shapes = torch.as_tensor(spatial_shapes_list, dtype=torch.long, device=value.device)
        if level_start_index is None:
            level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        return kernel(
            value.to(dtype).contiguous(),
            spatial_shapes,
            list(spatial_shapes_list),
            level_start_index.contiguous(),
            sampling_locations.to(dtype).contiguous(),
            attention_weights.to(dtype).contiguous(),
            _im2col_step(value.shape[0], im2col_step),
        )


def _deformable_forward(
    self: Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    encoder_hidden_states: Tensor | None = None,
    encoder_attention_mask: Tensor | None = None,
    position_embeddings: Tensor | None = None,
    reference_points: Tensor | None = None,
    spatial_shapes_list: list[tuple[int, int]] | None = None,
    level_start_index: Tensor | None = None,
    output_attentions: bool = False,
) -> tuple[Tensor, Tensor]:
    """`Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention.forward` (transformers 5.24) calling
    `self._xsam_attention` instead of the module-level function; the forward of `DispatchingDeformableAttention`.

    `encoder_attention_mask` and `output_attentions` are accepted and ignored, as in transformers; the attention
    weights are always returned as the second output.
    """
    if encoder_hidden_states is None or reference_points is None or spatial_shapes_list is None:
        raise ValueError(
            "deformable attention: encoder_hidden_states, reference_points and spatial_shapes_list are required "
            "(Mask2FormerPixelDecoderEncoderLayer passes all three)"
        )
    if position_embeddings is not None:
        hidden_states = hidden_states + position_embeddings
    batch_size, num_queries, _ = hidden_states.shape
    _, sequence_length, _ = encoder_hidden_states.shape
    if sum(height * width for height, width in spatial_shapes_list) != sequence_length:
        raise ValueError(
            f"deformable attention: spatial_shapes_list {spatial_shapes_list} does not cover the {sequence_length} "
            "encoder positions; align the spatial shapes with the flattened feature maps"
        )

    head_dim = self.d_model // self.n_heads
    value = self.value_proj(encoder_hidden_states)
    if attention_mask is not None:
        # transformers' mask is True at padding: padded keys contribute zero.
        value = value.masked_fill(attention_mask[..., None], float(0))
    value = value.view(batch_size, sequence_length, self.n_heads, head_dim)
    sampling_offsets = self.sampling_offsets(hidden_states).view(
        batch_size, num_queries, self.n_heads, self.n_levels, self.n_points, 2
    )
    attention_weights = self.attention_weights(hidden_states).view(
        batch_size, num_queries, self.n_heads, self.n_levels * self.n_points
    )
    attention_weights = nn.functional.softmax(attention_weights, -1).view(
        batch_size, num_queries, self.n_heads, self.n_levels, self.n_points
    )
    if reference_points.shape[-1] == 2:
        # Offsets are in pixels of each level: divide by (width, height) to get normalised units.
        offset_normalizer = torch.tensor(
            [[width, height] for height, width in spatial_shapes_list], dtype=torch.long, device=reference_points.device
        )
        sampling_locations = (
            reference_points[:, :, None, :, None, :]
            + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
        )
    elif reference_points.shape[-1] == 4:
        # Box references (cx, cy, w, h): offsets scale with half the box size.
        sampling_locations = (
            reference_points[:, :, None, :, None, :2]
            + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
        )
    else:
        raise ValueError(
            f"deformable attention: last dim of reference_points must be 2 or 4, got {reference_points.shape[-1]}"
        )

    attention: DeformableAttention = self._xsam_attention
    output = attention(
        value,
        spatial_shapes_list,
        level_start_index,
        sampling_locations,
        attention_weights,
        im2col_step=self.im2col_step,
    )
    return self.output_proj(output), attention_weights


class DispatchingDeformableAttention(Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
    """transformers' pixel-decoder deformable attention whose forward calls a `DeformableAttention` dispatcher.

    Never constructed: `install_attention` switches the class of existing instances, which keeps their parameters
    (same objects, names and state-dict keys) and `isinstance` against transformers' class. Unlike a forward bound on
    the instance, a class can be pickled by name (Ray, `torch.save` of a module) and deep-copied.
    """

    _xsam_attention: DeformableAttention
    forward = _deformable_forward


def install_attention(module: nn.Module, attention: DeformableAttention) -> int:
    """Make every `Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention` inside `module` use `attention`.

    Only these instances change (see `DispatchingDeformableAttention`); transformers' class and module globals stay
    as they are. The dispatcher is a plain attribute, not a submodule, so no parameter, buffer or state-dict key
    changes. Installing again replaces the dispatcher. Returns the number of attention modules changed.
    """
    count = 0
    for submodule in module.modules():
        if isinstance(submodule, Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
            submodule.__class__ = DispatchingDeformableAttention
            submodule._xsam_attention = attention
            count += 1
    return count


@dataclass(kw_only=True, slots=True, frozen=True)
class BackendChoice:
    """What `resolve_backend` decided.

    Attributes:
        backend: "kernel" (the compiled kernel for CUDA tensors, torch elsewhere) or "torch" (torch everywhere).
        reason: one line saying why, also logged once at INFO on `xsam.model.deformable`.
        kernel: the loaded hub layer when `backend == "kernel"`, else None.
    """

    backend: Literal["torch", "kernel"]
    reason: str
    kernel: KernelAttention | None = None


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Force huggingface_hub offline while the kernel loads, whatever HF_HUB_OFFLINE says.

    `kernels.get_kernel` reads `huggingface_hub.constants.HF_HUB_OFFLINE` at call time and then resolves the version
    and files from the local cache only; the flag is restored afterwards.
    """
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def _cached_kernel_dirs() -> list[Path]:
    """Where a pre-fetched kernel can be: `kernels` caches under KERNELS_CACHE or HF_HUB_CACHE, as a "kernel" repo
    (newer huggingface_hub) or a "model" repo (older caches)."""
    from huggingface_hub import constants

    root = Path(os.environ.get("KERNELS_CACHE") or constants.HF_HUB_CACHE)
    name = KERNEL_REPO_ID.replace("/", "--")
    return [root / f"kernels--{name}", root / f"models--{name}"]


@cache
def find_kernel() -> tuple[KernelAttention | None, str]:
    """Look for the compiled kernel without network access; the result is cached for the process.

    Returns:
        (the hub layer, a description) when it loads, else (None, why not).
    """
    if not torch.cuda.is_available():
        return None, "CUDA is not available (torch.cuda.is_available() is False)"
    try:
        from kernels import get_kernel
    except ImportError as error:
        return None, f"the `kernels` package is not importable ({error})"
    local_override = KERNEL_REPO_ID in os.environ.get("LOCAL_KERNELS", "")
    searched = _cached_kernel_dirs()
    if not local_override and not any(path.is_dir() for path in searched):
        return None, f"{KERNEL_REPO_ID} is not in the local cache (looked for {', '.join(map(str, searched))})"
    try:
        with _hub_offline():
            module: Any = get_kernel(KERNEL_REPO_ID, version=KERNEL_VERSION)
        kernel = module.layers.MultiScaleDeformableAttention()
    except Exception as error:  # any load failure means "no kernel"; the reason is kept for the log or the error
        return None, f"loading {KERNEL_REPO_ID} v{KERNEL_VERSION} offline failed: {type(error).__name__}: {error}"
    return kernel, f"{KERNEL_REPO_ID} v{KERNEL_VERSION} from the local cache, for CUDA tensors"


_announced: set[str] = set()


def _announce(choice: BackendChoice) -> BackendChoice:
    message = f"deformable attention backend: {choice.backend} ({choice.reason})"
    if message not in _announced:
        _announced.add(message)
        logger.info(message)
    return choice


def resolve_backend(requested: Backend) -> BackendChoice:
    """Decide which multi-scale deformable attention will run, and why.

    Args:
        requested: "torch" always uses `ms_deform_attn_torch`; "kernel" requires the compiled kernel (CUDA, the
            `kernels` package and `kernels-community/deformable-detr` already in the local cache) and raises when it
            is missing; "auto" uses the kernel when it is there and falls back to torch otherwise.

    Raises:
        ValueError: `requested` is not one of `BACKENDS`.
        RuntimeError: "kernel" was requested and the kernel cannot be loaded; the message names what is missing.
    """
    if requested not in BACKENDS:
        raise ValueError(f"deformable_backend={requested!r} must be one of {BACKENDS}")
    if requested == "torch":
        return _announce(BackendChoice(backend="torch", reason="requested"))
    kernel, reason = find_kernel()
    if kernel is not None:
        return _announce(BackendChoice(backend="kernel", reason=reason, kernel=kernel))
    if requested == "kernel":
        raise RuntimeError(
            f"deformable_backend='kernel' needs the compiled MultiScaleDeformableAttention kernel, but {reason}. "
            f"To get it: {KERNEL_HOWTO}. Or use deformable_backend='auto' (falls back to torch) or 'torch'."
        )
    return _announce(BackendChoice(backend="torch", reason=f"kernel unavailable: {reason}"))


def install_backend(pixel_decoder: nn.Module, backend: Backend = "auto") -> BackendChoice:
    """Resolve `backend` and make every deformable attention in `pixel_decoder` use it (see `install_attention`).

    Args:
        pixel_decoder: a `Mask2FormerPixelDecoder` (any module containing the deformable attention works).
        backend: "auto", "torch" or "kernel", as in `resolve_backend`.

    Returns:
        The decision, with its reason.
    """
    choice = resolve_backend(backend)
    install_attention(pixel_decoder, DeformableAttention(kernel=choice.kernel))
    return choice
