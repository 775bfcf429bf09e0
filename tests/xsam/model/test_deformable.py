"""Multi-scale deformable attention backends of the pixel decoder (xsam.model.deformable), on CPU.

The compiled kernel needs CUDA; here its dispatch is exercised with a fake kernel and an injected device predicate.
"""

import copy
import logging
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers.models.mask2former import modeling_mask2former
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    multi_scale_deformable_attention,
)

from tiny_decoder import CHANNELS, tiny_config
from tiny_decoder import pyramid as tiny_pyramid

from xsam.model import deformable
from xsam.model.decoder import MaskDecoder, MaskDecoderOutput
from xsam.model.deformable import (
    DeformableAttention,
    DispatchingDeformableAttention,
    install_attention,
    install_backend,
    is_cuda_tensor,
    ms_deform_attn_torch,
    resolve_backend,
)

ATTENTION = Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention
SEG_SIZE = (64, 96)  # (height, width) of the SAM input; the pyramid is at strides 8, 16, 32 of it. Not square, so
# a swapped (height, width) anywhere shows.
LEVEL_SHAPES = [
    [(6, 6)],
    [(8, 8), (4, 4), (2, 2)],
    [(5, 7), (3, 4), (1, 2), (1, 1)],
]


def pyramid(num_images: int, *, seed: int = 0) -> list[torch.Tensor]:
    return tiny_pyramid(num_images, SEG_SIZE, seed=seed)


def random_inputs(
    shapes: list[tuple[int, int]], *, batch: int, dtype: torch.dtype, heads: int = 2, head_dim: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    num_keys = sum(height * width for height, width in shapes)
    queries, points = 5, 3
    value = torch.randn(batch, num_keys, heads, head_dim, generator=generator, dtype=dtype)
    # Locations reach past the map edges (zero padding) as offsets do in practice.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator, dtype=dtype) * 1.4 - 0.2
    logits = torch.randn(batch, queries, heads, len(shapes) * points, generator=generator, dtype=dtype)
    weights = logits.softmax(-1).view(batch, queries, heads, len(shapes), points)
    return value, locations, weights


@pytest.mark.parametrize("shapes", LEVEL_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 3])
def test_torch_path_equals_transformers(shapes: list[tuple[int, int]], dtype: torch.dtype, batch: int) -> None:
    value, locations, weights = random_inputs(shapes, batch=batch, dtype=dtype)
    inputs = [tensor.requires_grad_(True) for tensor in (value, locations, weights)]
    ours = ms_deform_attn_torch(inputs[0], shapes, inputs[1], inputs[2])
    reference = multi_scale_deformable_attention(inputs[0], shapes, inputs[1], inputs[2])
    assert ours.shape == (batch, 5, 2 * 4) and ours.dtype == dtype
    tolerance = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-12}
    torch.testing.assert_close(ours, reference, **tolerance)
    # Gradients with respect to values, locations and weights agree too.
    upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ours_grads = torch.autograd.grad(ours, inputs, upstream)
    reference_grads = torch.autograd.grad(reference, inputs, upstream)
    for mine, theirs in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(mine, theirs, **tolerance)
    # spatial_shapes may also be the pixel decoder's long [L, 2] tensor.
    as_tensor = ms_deform_attn_torch(value, torch.tensor(shapes), locations, weights)
    torch.testing.assert_close(as_tensor, reference, **tolerance)


def test_torch_path_samples_bilinearly_with_zero_padding() -> None:
    # One level, one head, one channel holding its pixel index; check against hand-computed bilinear values.
    height, width = 2, 3
    value = torch.arange(height * width, dtype=torch.float64).view(1, height * width, 1, 1)
    centre_of_pixel_4 = [(1 + 0.5) / width, (1 + 0.5) / height]  # x, y of row 1, column 1
    between_0_and_1 = [1.0 / width, 0.5 / height]  # halfway between the centres of pixels 0 and 1
    outside = [1.5, 1.5]
    locations = torch.tensor([centre_of_pixel_4, between_0_and_1, outside], dtype=torch.float64)
    locations = locations.view(1, 3, 1, 1, 1, 2)
    weights = torch.ones(1, 3, 1, 1, 1, dtype=torch.float64)
    output = ms_deform_attn_torch(value, [(height, width)], locations, weights)
    torch.testing.assert_close(output.flatten(), torch.tensor([4.0, 0.5, 0.0], dtype=torch.float64))


def test_torch_path_rejects_mismatched_shapes() -> None:
    value, locations, weights = random_inputs([(4, 4), (2, 2)], batch=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn_torch(value, [(4, 4), (2, 3)], locations, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_torch(value, [(4, 4), (2, 2)], locations, weights[..., :2])


@pytest.mark.parametrize("reference_width", [2, 4])
def test_bound_forward_equals_transformers_forward_with_padding_mask(reference_width: int) -> None:
    # Branches the decoder does not reach: a padding mask and box (4-d) reference points.
    torch.manual_seed(0)
    module = ATTENTION(embed_dim=16, num_heads=2, n_levels=3, n_points=4)
    shapes = [(6, 5), (3, 3), (2, 1)]
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 41, 16, generator=generator)
    position = torch.randn(2, 41, 16, generator=generator)
    mask = torch.rand(2, 41, generator=generator) < 0.3
    reference_points = torch.rand(2, 41, 3, reference_width, generator=generator)
    start_index = torch.tensor([0, 30, 39])
    kwargs = {
        "attention_mask": mask,
        "encoder_hidden_states": hidden,
        "position_embeddings": position,
        "reference_points": reference_points,
        "spatial_shapes_list": shapes,
        "level_start_index": start_index,
    }
    expected_output, expected_weights = module(hidden, **kwargs)
    assert install_attention(module, DeformableAttention(kernel=None)) == 1
    output, weights = module(hidden, **kwargs)
    assert torch.equal(output, expected_output) and torch.equal(weights, expected_weights)
    with pytest.raises(ValueError, match="spatial_shapes_list"):
        module(hidden, **{**kwargs, "spatial_shapes_list": [(6, 5), (3, 3), (2, 2)]})


def restore_transformers_forward(decoder: MaskDecoder) -> MaskDecoder:
    """Undo `install_attention`, so the decoder runs transformers' own forward and attention function."""
    for module in decoder.modules():
        if isinstance(module, ATTENTION):
            module.__class__ = ATTENTION
            del module._xsam_attention
            assert module.forward.__func__ is ATTENTION.forward
    return decoder


def build_pair(backend: str = "torch") -> tuple[MaskDecoder, MaskDecoder]:
    """(transformers' forward, ours with `backend`) sharing one set of weights."""
    torch.manual_seed(0)
    reference = restore_transformers_forward(MaskDecoder(config=tiny_config(), feature_channels=CHANNELS))
    installed = copy.deepcopy(reference)
    assert install_backend(installed.pixel_decoder, backend).backend == "torch"
    return reference, installed


def flat(output: MaskDecoderOutput) -> tuple[torch.Tensor, ...]:
    return output.query_embeddings + output.mask_logits


def test_installed_torch_backend_reproduces_transformers_exactly() -> None:
    reference, installed = build_pair()
    layers = [module for module in installed.modules() if isinstance(module, ATTENTION)]
    assert len(layers) == tiny_config().encoder_layers
    assert all(type(module) is DispatchingDeformableAttention for module in layers)
    features = pyramid(2)
    seg = torch.randn(3, tiny_config().hidden_dim, generator=torch.Generator().manual_seed(4))
    batch_index = torch.tensor([1, 0, 1])
    expected = reference(features, seg_embeddings=seg, batch_index=batch_index)
    actual = installed(features, seg_embeddings=seg, batch_index=batch_index)
    for ours, theirs in zip(flat(actual), flat(expected), strict=True):
        assert torch.equal(ours, theirs)
    # The pixel decoder's intermediate outputs, attention weights included, are identical as well.
    ours = installed.pixel_decoder(features, output_attentions=True, output_hidden_states=False)
    theirs = reference.pixel_decoder(features, output_attentions=True, output_hidden_states=False)
    assert torch.equal(ours.mask_features, theirs.mask_features)
    for mine, other in zip(ours.attentions, theirs.attentions, strict=True):
        assert torch.equal(mine, other)


def test_gradients_reach_every_attention_parameter_and_match() -> None:
    reference, installed = build_pair()
    features = pyramid(2)
    for model in (reference, installed):
        output = model(features)
        loss = sum(masks.sigmoid().mean() for masks in output.mask_logits) + output.query_embeddings[-1].pow(2).mean()
        loss.backward()
    attention_parameters = {
        name: param
        for name, param in installed.named_parameters()
        if name.startswith("pixel_decoder.encoder.") and ".self_attn." in name
    }
    assert len(attention_parameters) == tiny_config().encoder_layers * 8  # 4 Linear layers, weight and bias
    reference_parameters = dict(reference.named_parameters())
    for name, param in attention_parameters.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, reference_parameters[name].grad, atol=1e-6, rtol=1e-5)


def test_state_dict_keys_unchanged_and_loadable() -> None:
    reference, installed = build_pair()
    assert list(installed.state_dict()) == list(reference.state_dict())
    assert [name for name, _ in installed.named_parameters()] == [name for name, _ in reference.named_parameters()]
    torch.manual_seed(1)
    fresh = MaskDecoder(config=tiny_config(), feature_channels=CHANNELS, deformable_backend="torch")
    fresh.load_state_dict(reference.state_dict(), strict=True)
    features = pyramid(1)
    for ours, theirs in zip(flat(fresh(features)), flat(reference(features)), strict=True):
        assert torch.equal(ours, theirs)


def test_install_is_per_instance() -> None:
    reference, installed = build_pair()
    # transformers' class and module-level function are untouched; only the installed copy's instances changed.
    assert modeling_mask2former.multi_scale_deformable_attention is multi_scale_deformable_attention
    assert ATTENTION.forward.__module__ == modeling_mask2former.__name__
    assert all(type(module) is ATTENTION for module in reference.modules() if isinstance(module, ATTENTION))
    # Installing again replaces the dispatcher rather than stacking wrappers.
    replacement = DeformableAttention(kernel=None)
    assert install_attention(installed, replacement) == tiny_config().encoder_layers
    assert all(
        type(module) is DispatchingDeformableAttention and module._xsam_attention is replacement
        for module in installed.modules()
        if isinstance(module, ATTENTION)
    )


def test_installed_decoder_survives_pickle_and_deepcopy() -> None:
    # Ray ships modules between processes by pickle; a forward bound on the instance would not survive it.
    _, installed = build_pair()
    features = pyramid(1)
    expected = flat(installed(features))
    for duplicate in (pickle.loads(pickle.dumps(installed)), copy.deepcopy(installed)):
        layers = [module for module in duplicate.modules() if isinstance(module, ATTENTION)]
        assert all(type(module) is DispatchingDeformableAttention for module in layers)
        assert all(isinstance(module._xsam_attention, DeformableAttention) for module in layers)
        for ours, theirs in zip(flat(duplicate(features)), expected, strict=True):
            assert torch.equal(ours, theirs)


def test_hub_kernel_is_pickled_by_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    # The loaded hub layer cannot be pickled by name: a copy looks it up again in the process that loads it.
    hub_kernel = FakeKernel()
    monkeypatch.setattr(deformable, "find_kernel", lambda: (hub_kernel, "fake hub kernel"))
    restored = pickle.loads(pickle.dumps(DeformableAttention(kernel=hub_kernel)))
    assert restored.kernel is hub_kernel and restored.on_device is is_cuda_tensor
    state = DeformableAttention(kernel=hub_kernel).__getstate__()
    assert isinstance(state["kernel"], str)
    # Where the kernel is missing, the copy runs the torch path.
    payload = pickle.dumps(DeformableAttention(kernel=hub_kernel))
    monkeypatch.setattr(deformable, "find_kernel", lambda: (None, "no kernel in this process"))
    assert pickle.loads(payload).kernel is None
    # Other kernels (here a test double) are pickled as they are.
    assert isinstance(pickle.loads(pickle.dumps(DeformableAttention(kernel=FakeKernel()))).kernel, FakeKernel)


def test_auto_resolves_to_torch_on_cpu_with_reason(caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the CPU fallback is what is tested here")
    deformable._announced.clear()
    with caplog.at_level(logging.INFO, logger="xsam.model.deformable"):
        first = resolve_backend("auto")
        second = resolve_backend("auto")
    assert first == second
    assert first.backend == "torch" and first.kernel is None
    assert "CUDA is not available" in first.reason
    messages = [record.getMessage() for record in caplog.records if record.name == "xsam.model.deformable"]
    assert messages == [f"deformable attention backend: torch ({first.reason})"]  # logged once, at INFO
    assert all(record.levelno == logging.INFO for record in caplog.records if record.name == "xsam.model.deformable")
    assert resolve_backend("torch").reason == "requested"


def test_kernel_request_without_kernel_raises_clear_error() -> None:
    try:
        resolve_backend("kernel")
    except RuntimeError as error:
        message = str(error)
    else:
        pytest.skip("the compiled kernel is available on this machine")
    assert "deformable_backend='kernel'" in message
    assert "CUDA is not available" in message or "kernels" in message
    assert "pip install kernels" in message and "kernels-community/deformable-detr" in message
    assert "deformable_backend='auto'" in message
    with pytest.raises(RuntimeError, match="pip install kernels"):
        MaskDecoder(config=tiny_config(), feature_channels=CHANNELS, deformable_backend="kernel")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend("cuda")  # type: ignore[arg-type]


class FakeKernel:
    """Records its calls and computes with the torch path, checking the arguments the hub layer requires."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(
        self,
        value: torch.Tensor,
        value_spatial_shapes: torch.Tensor,
        value_spatial_shapes_list: list[tuple[int, int]],
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        im2col_step: int,
    ) -> torch.Tensor:
        self.calls += 1
        assert value_spatial_shapes.dtype == torch.long
        assert value_spatial_shapes.tolist() == [list(shape) for shape in value_spatial_shapes_list]
        sizes = value_spatial_shapes.prod(1)
        assert level_start_index.tolist() == [0] + sizes.cumsum(0)[:-1].tolist()
        for tensor in (value, level_start_index, sampling_locations, attention_weights):
            assert tensor.is_contiguous()
        assert value.dtype == sampling_locations.dtype == attention_weights.dtype
        assert value.shape[0] % min(value.shape[0], im2col_step) == 0
        return ms_deform_attn_torch(value, value_spatial_shapes_list, sampling_locations, attention_weights)


def test_dispatch_uses_kernel_only_where_the_device_predicate_holds() -> None:
    shapes = [(8, 8), (4, 4), (2, 2)]
    value, locations, weights = random_inputs(shapes, batch=3, dtype=torch.float32)
    start_index = torch.tensor([0, 64, 80])
    expected = ms_deform_attn_torch(value, shapes, locations, weights)

    # The real predicate: CPU tensors never reach the kernel.
    kernel = FakeKernel()
    real = DeformableAttention(kernel=kernel)
    assert real.on_device is is_cuda_tensor and not is_cuda_tensor(value)
    assert torch.equal(real(value, shapes, start_index, locations, weights), expected)
    assert kernel.calls == 0

    # A stand-in predicate that calls these tensors "CUDA" routes them to the kernel, with its argument contract.
    on_accelerator = DeformableAttention(kernel=kernel, on_device=lambda tensor: True)
    assert torch.equal(on_accelerator(value, shapes, start_index, locations, weights, im2col_step=2), expected)
    assert kernel.calls == 1
    # level_start_index is derived when missing; non-contiguous inputs are made contiguous.
    strided = value.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(on_accelerator(strided, shapes, None, locations, weights), expected)
    assert kernel.calls == 2
    # Mixed precision (as under autocast): the kernel gets one dtype, the widest.
    half = on_accelerator(value.to(torch.bfloat16), shapes, start_index, locations, weights)
    assert kernel.calls == 3 and half.dtype == torch.float32
    torch.testing.assert_close(half, expected, atol=0.05, rtol=0.05)
    # Unsupported dtypes stay on the torch path even on the accelerator; no kernel means torch too.
    assert not on_accelerator.uses_kernel(value.to(torch.complex64), locations, weights)
    no_kernel = DeformableAttention(kernel=None, on_device=lambda tensor: True)
    assert torch.equal(no_kernel(value, shapes, start_index, locations, weights), expected)
    assert kernel.calls == 3


def test_fake_kernel_through_the_decoder_forward() -> None:
    reference, installed = build_pair()
    kernel = FakeKernel()
    install_attention(installed, DeformableAttention(kernel=kernel, on_device=lambda tensor: True))
    features = pyramid(2)
    for ours, theirs in zip(flat(installed(features)), flat(reference(features)), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert kernel.calls == tiny_config().encoder_layers
    install_attention(installed, DeformableAttention(kernel=kernel))  # real predicate: CPU stays on torch
    installed(features)
    assert kernel.calls == tiny_config().encoder_layers


def test_im2col_step_divides_batch() -> None:
    assert deformable._im2col_step(3, 128) == 3
    assert deformable._im2col_step(200, 128) == 100
    assert deformable._im2col_step(131, 128) == 1
    assert deformable._im2col_step(6, 4) == 3


def test_find_kernel_loads_only_from_the_local_cache_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Pretend CUDA and a `kernels` package exist; check the cache gate and that loading happens with the Hub offline.
    from huggingface_hub import constants

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("KERNELS_CACHE", str(tmp_path))
    monkeypatch.delenv("LOCAL_KERNELS", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    calls: list[tuple[str, int, bool]] = []

    class HubLayer(FakeKernel):
        pass

    def get_kernel(repo_id: str, *, version: int) -> types.SimpleNamespace:
        calls.append((repo_id, version, constants.HF_HUB_OFFLINE))
        return types.SimpleNamespace(layers=types.SimpleNamespace(MultiScaleDeformableAttention=HubLayer))

    monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_kernel=get_kernel))
    find_kernel = deformable.find_kernel.__wrapped__  # bypass the per-process cache
    kernel, reason = find_kernel()
    assert kernel is None and "not in the local cache" in reason and str(tmp_path) in reason
    assert calls == []  # nothing in the cache: `kernels` is not even asked

    (tmp_path / "kernels--kernels-community--deformable-detr").mkdir()
    kernel, reason = find_kernel()
    assert isinstance(kernel, HubLayer) and "from the local cache" in reason
    assert calls == [("kernels-community/deformable-detr", 1, True)]  # loaded with the Hub forced offline
    assert constants.HF_HUB_OFFLINE is False  # and the flag restored

    def failing_get_kernel(repo_id: str, *, version: int) -> None:
        raise ValueError("Version 1 is not available in the local cache")

    monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_kernel=failing_get_kernel))
    kernel, reason = find_kernel()
    assert kernel is None and "offline failed: ValueError: Version 1" in reason
    assert constants.HF_HUB_OFFLINE is False

    monkeypatch.setitem(sys.modules, "kernels", None)  # not installed
    kernel, reason = find_kernel()
    assert kernel is None and "`kernels` package is not importable" in reason
