"""`xsam data preview`: mask pixels carry their segment's colour, labels are drawn, the CLI writes a PNG."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dataprep.preview import (
    MASK_ALPHA,
    PreviewError,
    blend,
    display_base,
    load_sample,
    render_preview,
    segment_color,
)
from xsam.data.storage import open_storage
from pipelines.cli import app
from xsam.data import masks

KEY = "coco-panoptic-val2017-000000439180"
runner = CliRunner()






@pytest.fixture(scope="module")
def sample(panoptic):
    return load_sample(open_storage(panoptic), index=0)


@pytest.fixture(scope="module")
def rendered(sample):
    """(with labels, without labels, the displayed image before any overlay)."""
    with_labels = render_preview(sample.record, sample.image_bytes, sample.items)
    without = render_preview(sample.record, sample.image_bytes, sample.items, labels=False)
    base, scale = display_base(sample.image_bytes)
    assert scale == with_labels.scale
    return with_labels, without, base


def test_colours_are_deterministic_and_distinct():
    colours = [segment_color(i) for i in range(32)]
    assert colours == [segment_color(i) for i in range(32)]
    arr = np.array(colours, dtype=float)
    dist = np.linalg.norm(arr[:, None] - arr[None], axis=-1) + np.eye(32) * 1e9
    assert dist.min() > 60
    assert all(0 <= c <= 255 for col in (segment_color(100), segment_color(1000)) for c in col)


def test_mask_pixels_carry_their_segment_colour(sample, rendered):
    with_labels, _, base = rendered
    canvas = np.asarray(with_labels.image).astype(float)
    ox, oy = with_labels.origin
    record = sample.record
    ignore = masks.decode(record.ignore)
    colours = [segment_color(j) for j in range(len(record.segments))]
    checked = 0
    for i, seg in enumerate(record.segments):
        if seg.iscrowd:  # crowd pixels are also in the ignore region, hatched on top
            continue
        core = masks.decode(seg.rle)
        for _ in range(4):  # well inside: away from the outline
            core = core[1:-1, 1:-1] & core[:-2, 1:-1] & core[2:, 1:-1] & core[1:-1, :-2] & core[1:-1, 2:]
            core = np.pad(core, 1)
        core &= ~ignore
        ys, xs = np.nonzero(core)
        if xs.size == 0:
            continue
        pick = np.linspace(0, xs.size - 1, num=min(15, xs.size)).astype(int)
        for x, y in zip(xs[pick], ys[pick]):
            cx, cy = with_labels.to_canvas(x, y)
            if any(l - 3 <= cx <= r + 3 and t - 3 <= cy <= b + 3 for l, t, r, b in with_labels.label_boxes.values()):
                continue
            under = base[cy - oy, cx - ox].astype(float)
            got = canvas[cy, cx]
            assert np.abs(got - blend(under, colours[i])).max() <= 2, (i, x, y, got, under)
            distances = [np.linalg.norm(got - blend(under, c)) for c in colours]
            assert int(np.argmin(distances)) == i or colours[int(np.argmin(distances))] == colours[i]
            checked += 1
    assert checked > 100
    assert 0 < MASK_ALPHA < 1


def test_labels_are_drawn(sample, rendered):
    with_labels, without, _ = rendered
    a = np.asarray(with_labels.image).astype(int)
    b = np.asarray(without.image).astype(int)
    assert set(with_labels.label_boxes) == set(range(len(sample.record.segments)))
    assert without.label_boxes == {}
    for i, (l, t, r, bottom) in with_labels.label_boxes.items():
        box_a = a[t + 2 : bottom - 1, l + 2 : r - 1]
        box_b = b[t + 2 : bottom - 1, l + 2 : r - 1]
        assert (box_a != box_b).any(axis=-1).mean() > 0.3, f"label {i} changed too few pixels"
        fill = np.all(box_a == segment_color(i), axis=-1)
        assert fill.mean() > 0.3, f"label {i} box is not filled with its segment colour"
        assert (~fill).sum() > 15, f"label {i} has no text"
    # the label box of segment 1 sits on segment 1's mask (near its interior point)
    l, t, r, bottom = with_labels.label_boxes[1]
    mask = masks.decode(sample.record.segments[1].rle)
    ox, oy = with_labels.origin
    s = with_labels.scale
    cx, cy = int(((l + r) / 2 - ox) / s), int(((t + bottom) / 2 - oy) / s)
    ys, xs = np.nonzero(mask)
    assert np.hypot(xs - cx, ys - cy).min() < 25


def test_ignore_region_is_hatched(sample, rendered):
    with_labels, _, base = rendered
    canvas = np.asarray(with_labels.image).astype(int)
    base = base.astype(int)
    ox, oy = with_labels.origin
    ignore = masks.decode(sample.record.ignore)
    ys, xs = np.nonzero(ignore)
    pts = [with_labels.to_canvas(x, y) for x, y in zip(xs[::50], ys[::50])]
    changed = [np.abs(canvas[cy, cx] - base[cy - oy, cx - ox]).max() > 10 for cx, cy in pts]
    assert np.mean(changed) > 0.9


def test_conversation_panel_below_the_image(sample, rendered):
    with_labels, _, _ = rendered
    image = np.asarray(with_labels.image)
    _, oy = with_labels.origin
    panel = image[oy + round(sample.record.image.height * with_labels.scale) + 10 :]
    assert panel.shape[0] > 200  # the long genseg question wraps over many lines
    dark = (panel.max(axis=-1) < 100).mean()
    assert 0.005 < dark < 0.3


def test_preview_cli(panoptic, tmp_path):
    out = tmp_path / "sub" / "preview.png"
    result = runner.invoke(app, ["data", "preview", str(panoptic), "--key", KEY, "--png", str(out)])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output.replace("\n", "")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width >= 900 and im.height > 600

    by_index = tmp_path / "by-index.png"
    assert runner.invoke(app, ["data", "preview", str(panoptic), "--index", "0", "--png", str(by_index)]).exit_code == 0
    assert by_index.read_bytes() == out.read_bytes()

    for args, message in [
        (["--key", "nope"], "is not in"),
        (["--index", "5"], "out of range"),
        (["--index", "0", "--item", "3"], "out of range"),
        ([], "exactly one of"),
    ]:
        result = runner.invoke(app, ["data", "preview", str(panoptic), *args, "--png", str(tmp_path / "x.png")])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output.replace("\n", " ")


def test_load_sample_errors(panoptic):
    with pytest.raises(PreviewError):
        load_sample(open_storage(panoptic), key=KEY, index=0)
