"""Tiny random X-SAM mask decoder and class heads on CPU (spec §3 "Mask decoder", "Bridging LLM -> decoder", §8)."""

import math

import pytest
import torch
from tiny_decoder import CHANNELS, DECODER_LAYERS, HIDDEN, NUM_QUERIES, tiny_config
from tiny_decoder import pyramid as tiny_pyramid
from transformers import Mask2FormerConfig

from xsam.model.decoder import ClassHead, LinearClassHead, MaskDecoder, MaskDecoderOutput, decoder_config

SEG_SIZE = 128  # SAM input side; the pyramid is at strides 8, 16, 32 of it


def pyramid(num_images: int, *, seed: int = 0) -> list[torch.Tensor]:
    return tiny_pyramid(num_images, (SEG_SIZE, SEG_SIZE), seed=seed)


@pytest.fixture(scope="module")
def decoder() -> MaskDecoder:
    torch.manual_seed(0)
    return MaskDecoder(config=tiny_config(), feature_channels=CHANNELS)


def assert_outputs_close(a: MaskDecoderOutput, b: MaskDecoderOutput) -> None:
    for x, y in zip(a.query_embeddings + a.mask_logits, b.query_embeddings + b.mask_logits, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_config_matches_spec() -> None:
    config = decoder_config()
    assert (config.hidden_dim, config.feature_size, config.mask_feature_size) == (256, 256, 256)
    assert (config.encoder_layers, config.decoder_layers, config.num_attention_heads) == (6, 10, 8)
    assert (config.dim_feedforward, config.num_queries) == (2048, 200)
    assert list(config.feature_strides) == [4, 8, 16, 32] and config.common_stride == 4
    assert decoder_config(num_queries=100).num_queries == 100
    with pytest.raises(ValueError, match="multiple of 32"):
        decoder_config(hidden_dim=48)


def test_output_shapes_every_layer(decoder: MaskDecoder) -> None:
    output = decoder(pyramid(2))
    # decoder_layers predictions: one from the raw queries, then one per masked-attention layer.
    assert len(output.query_embeddings) == len(output.mask_logits) == DECODER_LAYERS
    for queries, masks in zip(output.query_embeddings, output.mask_logits):
        assert queries.shape == (2, NUM_QUERIES, HIDDEN)
        assert masks.shape == (2, NUM_QUERIES, SEG_SIZE // 8, SEG_SIZE // 8)
        assert torch.isfinite(queries).all() and torch.isfinite(masks).all()


def test_all_parameters_initialised() -> None:
    # Mask2FormerPixelDecoder.level_embed is allocated uninitialised; MaskDecoder must fill it.
    for seed in range(3):
        torch.manual_seed(seed)
        model = MaskDecoder(config=tiny_config(), feature_channels=CHANNELS)
        for name, param in model.named_parameters():
            assert torch.isfinite(param).all(), name
        assert model.pixel_decoder.level_embed.abs().max() < 10


def test_seg_embedding_added_to_queries(decoder: MaskDecoder) -> None:
    features = pyramid(2)
    plain = decoder(features)
    zero = decoder(features, seg_embeddings=torch.zeros(2, HIDDEN))
    assert_outputs_close(plain, zero)
    seg = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(1))
    conditioned = decoder(features, seg_embeddings=seg)
    for a, b in zip(plain.mask_logits + plain.query_embeddings, conditioned.mask_logits + conditioned.query_embeddings):
        assert not torch.allclose(a, b, atol=1e-3)


def test_seg_embedding_matches_shifted_query_features(decoder: MaskDecoder) -> None:
    # Adding s to every query feature equals a decoder whose learned query features are shifted by s.
    features = pyramid(1)
    seg = torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(2))
    conditioned = decoder(features, seg_embeddings=seg)
    shifted = MaskDecoder(config=tiny_config(), feature_channels=CHANNELS)
    shifted.load_state_dict(decoder.state_dict())
    with torch.no_grad():
        shifted.transformer_module.queries_features.weight.add_(seg)
    assert_outputs_close(conditioned, shifted(features))


def test_batch_index_equals_repeated_images(decoder: MaskDecoder) -> None:
    features = pyramid(2)
    batch_index = torch.tensor([1, 0, 1])
    seg = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(3))
    shared = decoder(features, seg_embeddings=seg, batch_index=batch_index)
    repeated = decoder([feature[batch_index] for feature in features], seg_embeddings=seg)
    assert_outputs_close(shared, repeated)
    # Each instance only sees its own image: instance 0 equals image 1 run alone.
    alone = decoder([feature[1:2] for feature in features], seg_embeddings=seg[0:1])
    assert_outputs_close(
        MaskDecoderOutput(
            query_embeddings=tuple(x[0:1] for x in shared.query_embeddings),
            mask_logits=tuple(x[0:1] for x in shared.mask_logits),
        ),
        alone,
    )


def test_rejects_bad_inputs(decoder: MaskDecoder) -> None:
    features = pyramid(2)
    with pytest.raises(ValueError, match="feature channels"):
        decoder(features[::-1])
    with pytest.raises(ValueError, match="one projected <SEG> per decoder instance"):
        decoder(features, seg_embeddings=torch.zeros(3, HIDDEN))
    with pytest.raises(ValueError, match="batch_index values"):
        decoder(features, batch_index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="3 levels"):
        MaskDecoder(config=tiny_config(), feature_channels=(32, 64))


def test_class_head_temperature_bg_and_padding() -> None:
    torch.manual_seed(0)
    head = ClassHead(hidden_dim=HIDDEN)
    assert head.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert head.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert head.bg_embed.shape == (1, HIDDEN)
    queries = torch.randn(2, NUM_QUERIES, HIDDEN)
    conditions = torch.randn(2, 4, HIDDEN)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    logits = head(queries, conditions, mask)
    assert logits.shape == (2, NUM_QUERIES, 5)
    cosine = torch.nn.functional.cosine_similarity
    expected_bg = cosine(queries, head.bg_embed.detach()[None], dim=-1) / 0.07
    torch.testing.assert_close(logits[..., -1], expected_bg, atol=1e-4, rtol=1e-4)
    expected_first = cosine(queries, conditions[:, None, 0], dim=-1) / 0.07
    torch.testing.assert_close(logits[..., 0], expected_first, atol=1e-4, rtol=1e-4)
    assert (logits[1, :, 2:4] == -1e9).all()
    assert (logits[1, :, [0, 1, 4]].abs() <= 1 / 0.07 + 1e-4).all()
    # Padded columns get no probability; the background column is never masked.
    probs = logits.softmax(-1)
    assert probs[1, :, 2:4].max() == 0 and (probs[..., -1] > 0).all()


def test_class_head_clamp() -> None:
    torch.manual_seed(0)
    queries = torch.randn(1, 3, HIDDEN)
    conditions = torch.cat([queries[:, :1], -queries[:, :1]], dim=1)  # cos = +1 and -1 for query 0
    mask = torch.ones(1, 2, dtype=torch.bool)
    paper = ClassHead(hidden_dim=HIDDEN)
    main = ClassHead(hidden_dim=HIDDEN, clamp=50.0, pad_logit=-1e6)
    for head, bound in ((paper, 500.0), (main, 50.0)):
        with torch.no_grad():
            head.logit_scale.fill_(10.0)  # exp(10) ~ 22026 would exceed either clamp
        logits = head(queries, conditions, mask)
        assert logits[0, 0, 0].item() == pytest.approx(bound)
        assert logits[0, 0, 1].item() == pytest.approx(-bound)
        assert logits.abs().max().item() == pytest.approx(bound)
    padded = main(queries, conditions, torch.tensor([[True, False]]))
    assert (padded[0, :, 1] == -1e6).all()
    with pytest.raises(ValueError, match="condition_mask"):
        paper(queries, conditions, torch.ones(1, 2))


def test_linear_class_head() -> None:
    head = LinearClassHead(hidden_dim=HIDDEN)
    assert head(torch.randn(2, NUM_QUERIES, HIDDEN)).shape == (2, NUM_QUERIES, 134)


def test_gradients_reach_queries_pixel_decoder_and_class_head(decoder: MaskDecoder) -> None:
    decoder.zero_grad()
    head = ClassHead(hidden_dim=HIDDEN)
    features = [feature.requires_grad_(True) for feature in pyramid(2)]
    seg = torch.randn(3, HIDDEN, requires_grad=True)
    output = decoder(features, seg_embeddings=seg, batch_index=torch.tensor([0, 1, 1]))
    conditions = torch.randn(3, 4, HIDDEN, requires_grad=True)
    mask = torch.tensor([[True] * 4, [True] * 4, [True, True, False, False]])
    loss = sum(masks.sigmoid().mean() for masks in output.mask_logits)
    for queries in output.query_embeddings:
        loss = loss + head(queries, conditions, mask).log_softmax(-1)[..., 0].mean()
    loss.backward()
    pixel = decoder.pixel_decoder
    # pixel.level_embed gets no gradient on the first step: it only enters the deformable-attention queries, whose
    # offset and attention-weight projections start at zero weight (Deformable DETR init).
    reached = {
        "query features": decoder.transformer_module.queries_features.weight,
        "query positions": decoder.transformer_module.queries_embedder.weight,
        "decoder layer": decoder.transformer_module.decoder.layers[0].cross_attn.in_proj_weight,
        "mask embedder": decoder.transformer_module.decoder.mask_predictor.mask_embedder.get_submodule("0.0").weight,
        "pixel input projection": pixel.input_projections[0][0].weight,
        "deformable value": pixel.encoder.layers[0].self_attn.value_proj.weight,
        "deformable offsets": pixel.encoder.layers[0].self_attn.sampling_offsets.weight,
        "fpn lateral": pixel.adapter_1[0].weight,
        "mask projection": pixel.mask_projection.weight,
        "logit scale": head.logit_scale,
        "bg embed": head.bg_embed,
        "seg embeddings": seg,
        "conditions": conditions,
        "stride-32 input": features[2],
    }
    for name, param in reached.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    decoder.zero_grad()


def expected_parameter_count(config: Mask2FormerConfig, channels: tuple[int, ...]) -> int:
    """Count from the Mask2Former architecture (Cheng et al. 2022; Deformable DETR: 4 points, 3 levels)."""

    def linear(fan_in: int, fan_out: int) -> int:
        return fan_in * fan_out + fan_out

    d, dm, heads, levels, points = config.feature_size, config.mask_feature_size, config.num_attention_heads, 3, 4
    norm = 2 * d  # GroupNorm / LayerNorm weight and bias
    input_projections = sum(linear(c, d) + norm for c in channels)
    deformable = linear(d, heads * levels * points * 2) + linear(d, heads * levels * points) + 2 * linear(d, d)
    ffn = config.encoder_feedforward_dim
    encoder_layer = deformable + norm + linear(d, ffn) + linear(ffn, d) + norm
    fpn = channels[0] * d + norm + 9 * d * d + norm  # lateral 1x1 and output 3x3 convolutions, no bias
    pixel_decoder = input_projections + levels * d + config.encoder_layers * encoder_layer + linear(d, dm) + fpn

    h, ff = config.hidden_dim, config.dim_feedforward
    norm = 2 * h
    self_attention = 4 * linear(h, h)  # q, k, v, out
    cross_attention = linear(h, 3 * h) + linear(h, h)  # nn.MultiheadAttention in_proj, out_proj
    decoder_layer = self_attention + norm + cross_attention + norm + linear(h, ff) + linear(ff, h) + norm
    mask_mlp = 2 * linear(h, h) + linear(h, dm)
    queries = 2 * config.num_queries * h  # learned query features and query positions
    layers = (config.decoder_layers - 1) * decoder_layer + norm  # masked-attention layers, final LayerNorm
    transformer = queries + levels * h + layers + mask_mlp
    return pixel_decoder + transformer


def test_paper_parameter_count_on_meta_device() -> None:
    config = decoder_config()
    with torch.device("meta"):
        model = MaskDecoder(config=config)
    count = sum(param.numel() for param in model.parameters())
    expected = expected_parameter_count(config, (512, 1024, 2048))
    print(f"paper decoder parameters (num_queries={config.num_queries}): {count:,}; independent count {expected:,}")
    assert count == expected
    assert expected_parameter_count(tiny_config(), CHANNELS) == sum(
        param.numel() for param in MaskDecoder(config=tiny_config(), feature_channels=CHANNELS).parameters()
    )
