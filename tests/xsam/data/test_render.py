"""Tests of xsam.data.render: templates file, determinism, and every task's item shape.

genseg runs on a Record built from the real COCO panoptic sample (image 439180, 32 segments, 2 crowd);
the other tasks, whose converters come later, on small hand-built records.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import yaml
from builders import panoptic_sample_record, tiny_record
from conftest import (
    CORPORA,  # ../shared/corpora, or the shipped copy in examples/corpora
)

from xsam.data.render import (
    Category,
    RenderOptions,
    TemplateError,
    Templates,
    clean_category_name,
    load_templates,
    render_record,
    resolve_mode,
    rng_for,
)
from xsam.data.schema import ChatTurn, Item, Record, VisualPrompt

COCO_PANOPTIC = CORPORA / "coco_panoptic"
PACKAGED = Path(__file__).resolve().parents[3] / "xsam" / "data" / "templates.yaml"
SPAN = re.compile(r"<p>(.*?)</p>")


# ----------------------------------------------------------------------------------------- fixtures


def coco_panoptic_record() -> tuple[Record, list[Category]]:
    """The real COCO panoptic val2017 image 439180 as a genseg Record, plus the 133-category table."""
    record, _, doc = panoptic_sample_record(CORPORA)
    vocabulary = [Category(id=c["id"], name=c["name"], isthing=bool(c["isthing"])) for c in doc["categories"]]
    return record, vocabulary


@pytest.fixture(scope="module")
def coco() -> tuple[Record, list[Category]]:
    return coco_panoptic_record()


@pytest.fixture(scope="module")
def templates() -> Templates:
    return load_templates()


TRAIN = RenderOptions(mode="train")
EVAL = RenderOptions(mode="eval")


def refseg_record(split: str = "train") -> Record:
    """Two objects (2 and 1 sentences) and one no-target expression (gRefCOCO style)."""
    return tiny_record(
        "refseg",
        2,
        split,
        phrases=["man in red", "left guy", "dog on the right", "a purple elephant"],
        meta={"phrase_segments": [[0], [0], [1], []]},
    )


def dump(items: list[Item]) -> list[dict]:
    return [i.model_dump() for i in items]


def check_valid(items: list[Item]) -> None:
    for item in items:
        Item.model_validate(item.model_dump())  # re-validates <SEG>/<p> counts
        assert all("<|" not in t.text for t in item.turns), "no LLM chat markers in rendered text"
        first_user = next(t for t in item.turns if t.role == "user")
        assert first_user.text.startswith("<image>")
        assert sum(t.text.count("<image>") for t in item.turns) == 1


# ---------------------------------------------------------------------------------------- templates


def test_packaged_templates_have_stable_ids_and_sha256(templates: Templates) -> None:
    assert templates.version == "1.0.0"
    assert templates.sha256 == hashlib.sha256(PACKAGED.read_bytes()).hexdigest()
    assert [t.id for t in templates.group("genseg", "questions")] == [f"genseg.q{i}" for i in range(6)]
    assert [t.id for t in templates.group("genseg", "answers")] == [f"genseg.a{i}" for i in range(5)]
    assert [t.text for t in templates.group("refseg", "answers")] == [
        "<SEG>.", "It is <SEG>.", "Sure, <SEG>.", "Sure, it is <SEG>.", "Sure, the segmentation mask is <SEG>."
    ]
    assert len(templates.group("refseg", "questions")) == 10
    (no_target,) = templates.group("refseg", "grefseg_no_target")
    assert no_target.text.count("<SEG>") == 1
    all_ids = [t.id for groups in templates.groups.values() for g in groups.values() for t in g]
    assert len(all_ids) == len(set(all_ids))


def write_variant(tmp_path: Path, edit) -> Path:
    doc = yaml.safe_load(PACKAGED.read_bytes())
    edit(doc)
    path = tmp_path / "templates.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def test_template_override_changes_text_and_sha256(tmp_path: Path, coco, templates: Templates) -> None:
    record, vocabulary = coco

    def edit(doc: dict) -> None:
        doc["tasks"]["genseg"]["questions"][0]["text"] = "Segment these: {categories}."

    custom = load_templates(write_variant(tmp_path, edit))
    assert custom.sha256 != templates.sha256
    assert custom.sha256 == hashlib.sha256((tmp_path / "templates.yaml").read_bytes()).hexdigest()
    (item,) = render_record(record, seed=0, epoch=0, templates=custom, options=EVAL, vocabulary=vocabulary)
    assert item.turns[0].text.startswith("<image>\nSegment these: <p>person</p>, <p>bicycle</p>")
    (default,) = render_record(record, seed=0, epoch=0, templates=templates, options=EVAL, vocabulary=vocabulary)
    assert default.turns[0].text != item.turns[0].text


@pytest.mark.parametrize(
    ("edit", "key", "why"),
    [
        (lambda d: d["tasks"]["refseg"].pop("answers"), "tasks.refseg", "expected groups"),
        (lambda d: d["tasks"]["refseg"]["answers"][1].update(text="<SEG> and <SEG>."),
         "tasks.refseg.answers[1].text", "exactly 1 <SEG>"),
        (lambda d: d["tasks"]["genseg"]["questions"][2].update(text="Segment {categoreis}."),
         "tasks.genseg.questions[2].text", "placeholders must be exactly {categories}"),
        (lambda d: d["tasks"]["refseg"]["questions"][0].update(text="Segment {phrase}."),
         "tasks.refseg.questions[0].text", "exactly 1 <p>"),
        (lambda d: d["tasks"]["vgdseg"]["answers"][0].update(id="genseg.a0"),
         "tasks.vgdseg.answers[0].id", "must be a string 'vgdseg."),
        (lambda d: d["tasks"]["ovseg"]["answers"][1].update(id="ovseg.a0"),
         "tasks.ovseg.answers[1].id", "duplicate id"),
        (lambda d: d.pop("version"), "(top)", "exactly the keys"),
        (lambda d: d["tasks"].update(segment={}), "tasks", "unknown tasks ['segment']"),
    ],
    ids=["missing-group", "two-seg", "unknown-placeholder", "unwrapped-phrase", "foreign-id", "duplicate-id",
         "no-version", "unknown-task"],
)
def test_malformed_templates_name_file_and_key(tmp_path: Path, edit, key: str, why: str) -> None:
    path = write_variant(tmp_path, edit)
    with pytest.raises(TemplateError) as info:
        load_templates(path)
    message = str(info.value)
    assert str(path) in message and f"key {key!r}" in message and why in message, message


def test_invalid_yaml_is_a_template_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("version: [1\n", encoding="utf-8")
    with pytest.raises(TemplateError, match=re.escape(str(path))):
        load_templates(path)


# -------------------------------------------------------------------------------------- determinism


def test_rng_for_is_a_pure_function_of_its_four_values() -> None:
    draw = lambda *args: [rng_for(*args).random() for _ in range(3)]  # noqa: E731
    assert draw(0, "k", 0, 0) == draw(0, "k", 0, 0)
    base = draw(0, "k", 0, 0)
    for args in [(1, "k", 0, 0), (0, "k2", 0, 0), (0, "k", 1, 0), (0, "k", 0, 1)]:
        assert draw(*args) != base


def test_genseg_train_is_reproducible_and_changes_per_epoch(coco, templates) -> None:
    record, vocabulary = coco
    render = lambda seed, epoch: render_record(  # noqa: E731
        record, seed=seed, epoch=epoch, templates=templates, options=TRAIN, vocabulary=vocabulary
    )
    first = render(7, 0)
    assert dump(render(7, 0)) == dump(first)
    assert first[0].turns != render(7, 1)[0].turns
    assert first[0].turns != render(8, 0)[0].turns
    check_valid(first)


def test_genseg_eval_is_fixed_template_0_in_id_order(coco, templates) -> None:
    record, vocabulary = coco
    items = [
        render_record(record, seed=s, epoch=e, templates=templates, options=EVAL, vocabulary=vocabulary)
        for s, e in [(0, 0), (3, 5)]
    ]
    (a,), (b,) = items
    assert a.mode == "eval" and a.template_ids == ["genseg.q0", "genseg.a0"]
    assert a.turns == b.turns and a.spans == b.spans and a.segs == b.segs
    assert (b.seed, b.epoch) == (3, 5)  # items still carry seed/epoch
    names = SPAN.findall(a.turns[0].text)
    assert names == [clean_category_name(c.name) for c in sorted(vocabulary, key=lambda c: c.id)]
    check_valid([a])


def test_mode_auto_follows_the_split(coco) -> None:
    record, _ = coco
    assert resolve_mode(record, RenderOptions()) == "eval"  # val2017
    train = record.model_copy(update={"source": record.source.model_copy(update={"split": "train2017"})})
    assert resolve_mode(train, RenderOptions()) == "train"
    assert resolve_mode(train, EVAL) == "eval"


# ------------------------------------------------------------------------------------------- genseg


@pytest.mark.parametrize("options", [TRAIN, EVAL], ids=["train", "eval"])
def test_genseg_one_span_per_category_and_targets_name_their_category(coco, templates, options) -> None:
    record, vocabulary = coco
    (item,) = render_record(record, seed=1, epoch=2, templates=templates, options=options, vocabulary=vocabulary)
    check_valid([item])
    assert len(item.spans) == len(vocabulary) == 133
    assert all(s.turn == 0 and s.phrase_index is None for s in item.spans)
    names = SPAN.findall(item.turns[0].text)
    assert len(names) == 133
    (seg,) = item.segs
    assert seg.turn == 1 and item.turns[1].text.count("<SEG>") == 1
    non_crowd = [i for i, s in enumerate(record.segments) if not s.iscrowd]
    assert len(non_crowd) == 30 and [t.segment for t in seg.targets] == non_crowd  # crowd is not a target
    for target in seg.targets:
        assert names[target.span] == clean_category_name(record.segments[target.segment].category_name)


def test_image_prefix_newline_option(coco, templates) -> None:
    record, vocabulary = coco
    (paper,) = render_record(record, seed=0, epoch=0, templates=templates, vocabulary=vocabulary)
    assert paper.turns[0].text.startswith("<image>\nCan you segment")
    options = RenderOptions(image_newline=False)
    (main,) = render_record(record, seed=0, epoch=0, templates=templates, options=options, vocabulary=vocabulary)
    assert main.turns[0].text.startswith("<image>Can you segment")


def test_sampled_vocabulary_keeps_all_positives(coco, templates) -> None:
    record, vocabulary = coco
    options = RenderOptions.main_branch(mode="train")
    positives = {clean_category_name(s.category_name) for s in record.segments if not s.iscrowd}
    sizes = set()
    for epoch in range(8):
        (item,) = render_record(
            record, seed=0, epoch=epoch, templates=templates, options=options, vocabulary=vocabulary
        )
        check_valid([item])
        names = SPAN.findall(item.turns[0].text)
        assert positives <= set(names) and len(names) == len(set(names)) == len(item.spans)
        assert len(positives) <= len(names) <= 128
        sizes.add(len(names))
    assert len(sizes) > 1  # the number of negatives is redrawn per epoch


def test_genseg_without_vocabulary_uses_record_categories(coco, templates) -> None:
    record, _ = coco
    (item,) = render_record(record, seed=0, epoch=0, templates=templates, options=EVAL)
    expected = sorted({s.category_id for s in record.segments})
    assert len(item.spans) == len(expected) == 7


def test_genseg_target_outside_vocabulary_is_an_error(coco, templates) -> None:
    record, vocabulary = coco
    without_person = [c for c in vocabulary if c.name != "person"]
    with pytest.raises(ValueError, match=f"record {record.key}.*not in the vocabulary"):
        render_record(record, seed=0, epoch=0, templates=templates, vocabulary=without_person)


def test_ovseg_uses_its_own_template_ids(coco, templates) -> None:
    record, vocabulary = coco
    ovseg = record.model_copy(update={"task": "ovseg"})
    (item,) = render_record(ovseg, seed=0, epoch=0, templates=templates, options=EVAL, vocabulary=vocabulary)
    assert item.task == "ovseg" and item.template_ids == ["ovseg.q0", "ovseg.a0"]


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("wall-other-merged", "wall"),
        ("floor-wood", "floor wood"),
        ("door-stuff", "door"),
        ("sky-other-merged", "sky"),
        ("Traffic Light", "traffic light"),
        ("building;edifice", "building"),
        ("building, edifice", "building"),
    ],
)
def test_clean_category_name(raw: str, clean: str) -> None:
    assert clean_category_name(raw) == clean


# ------------------------------------------------------------------------------------------- refseg


def test_refseg_train_is_one_item_with_one_turn_per_object(templates) -> None:
    record = refseg_record()
    seen_sentences = set()
    for epoch in range(12):
        items = render_record(record, seed=0, epoch=epoch, templates=templates)
        check_valid(items)
        (item,) = items
        assert item.mode == "train" and item.key == f"{record.key}#0"
        # objects {0}, {1} and the no-target group: one question/answer pair each
        assert [t.role for t in item.turns] == ["user", "assistant"] * 3
        assert [s.turn for s in item.spans] == [0, 2, 4] and [g.turn for g in item.segs] == [1, 3, 5]
        by_target = {}
        for k, (span, seg) in enumerate(zip(item.spans, item.segs, strict=True)):
            assert all(t.span == k for t in seg.targets)
            by_target[tuple(t.segment for t in seg.targets)] = span.phrase_index
            assert SPAN.findall(item.turns[2 * k].text) == [record.phrases[span.phrase_index]]
        assert by_target[(0,)] in (0, 1) and by_target[(1,)] == 2 and by_target[()] == 3
        no_target_turn = item.turns[2 * [s.phrase_index for s in item.spans].index(3) + 1]
        assert no_target_turn.text == "There is no such object in the image. <SEG>."
        seen_sentences.add(by_target[(0,)])
        assert len(item.template_ids) == 6
    assert seen_sentences == {0, 1}  # a random sentence per object, redrawn per epoch


def test_refseg_eval_is_one_item_per_sentence(templates) -> None:
    record = refseg_record(split="testa")
    items = render_record(record, seed=0, epoch=0, templates=templates)
    check_valid(items)
    assert [i.key for i in items] == [f"{record.key}#{i}" for i in range(4)]
    assert all(i.mode == "eval" and len(i.turns) == 2 and len(i.spans) == 1 for i in items)
    assert [i.spans[0].phrase_index for i in items] == [0, 1, 2, 3]
    assert [[t.segment for t in i.segs[0].targets] for i in items] == [[0], [0], [1], []]
    assert [i.template_ids for i in items[:3]] == [["refseg.q0", "refseg.a0"]] * 3
    assert items[3].template_ids == ["refseg.q0", "refseg.grefseg_no_target.a0"]
    assert items[0].turns[0].text == "<image>\nPlease segment <p>man in red</p> in this image."


def test_refseg_needs_phrase_segments(templates) -> None:
    record = tiny_record("refseg", 1, phrases=["x"])
    with pytest.raises(ValueError, match=r'meta\["phrase_segments"\]'):
        render_record(record, seed=0, epoch=0, templates=templates)


# --------------------------------------------------------------------------------- reaseg, gcg, vgd


def test_reaseg_all_queries_as_turns_and_explanations(templates) -> None:
    record = tiny_record(
        "reaseg",
        1,
        phrases=["the thing you sit on", "what keeps the rain off?"],
        meta={"explanations": ["Chairs are for sitting.", None], "is_sentence": [False, True]},
    )
    explained = set()
    for epoch in range(16):
        (item,) = render_record(record, seed=0, epoch=epoch, templates=templates)
        check_valid([item])
        assert len(item.spans) == len(item.segs) == 2
        assert all([t.segment for t in seg.targets] == [0] for seg in item.segs)
        for k, span in enumerate(item.spans):
            answer = item.turns[2 * k + 1].text
            if span.phrase_index == 1:
                assert item.template_ids[2 * k].startswith("reaseg.qs")  # long query, no explanation
                assert "Chairs" not in answer
            explained.add(answer.startswith("Chairs are for sitting. "))
    assert explained == {True, False}  # p = 0.5 per turn
    evals = render_record(record, seed=0, epoch=0, templates=templates, options=EVAL)
    check_valid(evals)
    assert [i.template_ids for i in evals] == [["reaseg.q0", "reaseg.a0"], ["reaseg.qs0", "reaseg.a0"]]


def test_gcgseg_wraps_caption_spans(templates) -> None:
    caption = "A man walks a dog in the park."
    record = tiny_record(
        "gcgseg",
        3,
        phrases=["the park", "A man", "a dog"],
        captions=[caption],
        meta={"phrase_char_spans": [[21, 29], [0, 5], [12, 17]], "phrase_segments": [[2], [0], [1]]},
    )
    for options in (TRAIN, EVAL):
        (item,) = render_record(record, seed=0, epoch=0, templates=templates, options=options)
        check_valid([item])
        answer = item.turns[1].text
        assert "<p>A man</p>  walks <p>a dog</p>  in <p>the park</p> ." in answer  # X-SAM tag_caption spacing and answer.endswith("<SEG>.")
        assert [s.phrase_index for s in item.spans] == [1, 2, 0] and all(s.turn == 1 for s in item.spans)
        assert [(t.segment, t.span) for t in item.segs[0].targets] == [(0, 0), (1, 1), (2, 2)]
    assert item.template_ids == ["gcgseg.q0", "gcgseg.a0"]
    overlapping = record.model_copy(update={"meta": {**record.meta, "phrase_char_spans": [[21, 29], [0, 5], [3, 17]]}})
    with pytest.raises(ValueError, match="overlaps"):
        render_record(overlapping, seed=0, epoch=0, templates=templates)


@pytest.mark.parametrize("task", ["vgdseg", "intseg"])
def test_region_tasks_one_region_per_group(templates, task: str) -> None:
    record = tiny_record(task, 3)
    prompts = [  # two kinds for the (100, 101) group, one for 102
        VisualPrompt(kind="mask", rle=record.segments[0].rle, segment_ids=[100, 101]),
        VisualPrompt(kind="box", geometry={"box": [2, 0, 1, 4]}, seed=5, segment_ids=[102]),
        VisualPrompt(kind="point", geometry={"points": [[1, 1]]}, seed=6, segment_ids=[100, 101]),
    ]
    record = record.model_copy(update={"visual_prompts": prompts})
    train = render_record(record, seed=0, epoch=0, templates=templates, options=TRAIN)
    evaluation = render_record(record, seed=0, epoch=0, templates=templates, options=EVAL)
    check_valid(train + evaluation)
    (item,) = train  # one region per group, a random prompt of each
    assert item.turns[0].text.count("<p><region></p>") == 2
    assert all(s.phrase_index is None for s in item.spans)
    assert sorted(len(prompts[s.prompt_index].segment_ids) for s in item.spans) == [1, 2]
    for it in train + evaluation:
        for target in it.segs[0].targets:
            prompt = prompts[it.spans[target.span].prompt_index]
            assert record.segments[target.segment].id in prompt.segment_ids
    if task == "vgdseg":  # evaluation: one item, each group's first prompt, record order
        (item,) = evaluation
        assert [s.prompt_index for s in item.spans] == [0, 1]
        assert len(item.segs[0].targets) == 3
    else:  # intseg evaluation: one item per instance group, one region, its targets only
        assert [[s.prompt_index for s in it.spans] for it in evaluation] == [[0], [1]]
        assert [len(it.segs[0].targets) for it in evaluation] == [2, 1]


def test_chat_moves_image_to_the_front(templates) -> None:
    conversations = [
        ChatTurn.model_validate({"from": "human", "value": "What is in the picture?\n<image>"}),
        ChatTurn.model_validate({"from": "gpt", "value": "A cat."}),
        ChatTurn.model_validate({"from": "human", "value": "What colour is it?"}),
        ChatTurn.model_validate({"from": "gpt", "value": "Black."}),
    ]
    record = tiny_record("chat", 0, conversations=conversations)
    (item,) = render_record(record, seed=0, epoch=0, templates=templates)
    check_valid([item])
    assert [(t.role, t.text) for t in item.turns] == [
        ("user", "<image>\nWhat is in the picture?"),
        ("assistant", "A cat."),
        ("user", "What colour is it?"),
        ("assistant", "Black."),
    ]
    assert item.spans == [] and item.segs == [] and item.template_ids == []
    (main,) = render_record(record, seed=0, epoch=0, templates=templates, options=RenderOptions(image_newline=False))
    assert main.turns[0].text == "<image>What is in the picture?"


def test_reserved_strings_in_phrases_are_rejected(templates) -> None:
    record = tiny_record("refseg", 1, phrases=["the <SEG> man"], meta={"phrase_segments": [[0]]})
    with pytest.raises(ValueError, match="reserved string <SEG>"):
        render_record(record, seed=0, epoch=0, templates=templates)


def test_vgd_training_adds_up_to_five_negative_regions(templates) -> None:
    record = tiny_record("vgdseg", 3)
    prompts = [
        VisualPrompt(kind="box", geometry={"box": [0, 0, 2, 2]}, seed=1, segment_ids=[100], phrase_index=None),
        VisualPrompt(kind="box", geometry={"box": [1, 1, 3, 3]}, seed=2, segment_ids=[101, 102]),
    ]
    record = record.model_copy(update={"visual_prompts": prompts})
    negatives = []
    for epoch in range(40):
        (item,) = render_record(record, seed=0, epoch=epoch, templates=templates, options=TRAIN)
        check_valid([item])
        empty = [k for k, s in enumerate(item.spans) if s.prompt_index is None]
        assert len(item.spans) - len(empty) == 2 and len(empty) <= 5
        assert not {t.span for t in item.segs[0].targets} & set(empty)  # negatives have no target
        negatives.append(len(empty))
    assert 0 in negatives and max(negatives) > 0  # p = 0.5: some epochs have none, some have some
    intseg = record.model_copy(update={"task": "intseg"})
    for epoch in range(10):
        (item,) = render_record(intseg, seed=0, epoch=epoch, templates=templates, options=TRAIN)
        assert all(s.prompt_index is not None for s in item.spans)
