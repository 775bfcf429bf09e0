"""Render a `Record` into its `Item`s: X-SAM's instruction templates, made deterministic.

Spec: /work/shared/xsam-spec.md §1.3 (templates, sampling, one `<SEG>` per answer turn), §1.4
(one sample per task), §7 pitfalls 2, 3 and 6 (unseeded template choice, categories sampled once per
run, gRefCOCO no-target refs dropped) and §8 (the paper branch AAAI26_Archive, which we follow by
default; `main`'s behaviour is an option). Paper: X-SAM, arXiv 2508.04655.

Determinism. Upstream draws templates with the global `random` inside dataloader workers, so prompts
differ between runs, workers and even evaluations. Here every random choice of item `i` of a record
comes from `rng_for(seed, record.key, epoch, i)`: a `random.Random` seeded with the sha256 of those
four values, so an item is a pure function of (record, templates, options, seed, epoch, i) and
changes from epoch to epoch. Evaluation renders template 0 and no random choice at all.

Modes. `RenderOptions.mode="auto"` renders training items for splits whose name starts with
"train" and evaluation items otherwise. The two differ per task (see each `_render_*` function).

Conventions for `Record.meta` (set by converters, read here):
- `meta["phrase_segments"]`: `list[list[int]]`, one entry per `Record.phrases`, the indices into
  `Record.segments` that the phrase refers to. An empty list means the phrase has no target
  (gRefCOCO no-target expressions). Required for refseg and gcgseg; for reaseg it defaults to
  "every phrase refers to every segment" (all queries of a ReasonSeg image share one target).
  This lives in `meta` because `Segment.phrase_index` holds one phrase per segment, while a RefCOCO
  object has several sentences and a gRefCOCO sentence may refer to several objects.
- `meta["phrase_char_spans"]` (gcgseg): `list[[start, end]]`, one per phrase, the phrase's
  character span in `Record.captions[0]` (Python slice bounds; spans must not overlap).
- `meta["explanations"]` (reaseg, optional): a list aligned with `Record.phrases`, each a string or
  None; a phrase with an explanation becomes an explanatory turn with p = 0.5 in training.
- `meta["is_sentence"]` (reaseg, optional): a bool for all phrases or a list aligned with them;
  True selects the long-query questions ("<p>…</p> Please output …"), default False (short query).

Markup. The first user turn of every item starts with `<image>` (followed by "\\n" on the paper
branch). The k-th `<p>…</p>` of the item (reading order over all turns) is `Item.spans[k]`; each
answer turn holds one `<SEG>`, whose targets are classified by span index. No LLM chat markers
(Phi-3, Qwen3) appear here: wrapping turns in a chat template is the loader's job.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import random
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from xsam.data.schema import (
    IMAGE_TOKEN,
    PHRASE_END,
    PHRASE_START,
    REGION_TOKEN,
    SEG_TOKEN,
    Item,
    Record,
    SegAnswer,
    SegTarget,
    Span,
    Turn,
    checked_model,
    item_key,
)

Mode = Literal["train", "eval"]

# Strings that only the renderer may place in a text: a phrase, caption or conversation holding one
# would desynchronise the <SEG>/<p> counts from Item.segs/Item.spans.
_SPECIAL = (IMAGE_TOKEN, REGION_TOKEN, SEG_TOKEN, PHRASE_START, PHRASE_END)
_REGION_SPAN = f"{PHRASE_START}{REGION_TOKEN}{PHRASE_END}"


# --------------------------------------------------------------------------------------- templates


class TemplateError(ValueError):
    """A templates file that does not have the structure `render` needs (names file and key)."""


@dataclass(frozen=True, slots=True)
class Template:
    """One template variant: a stable id and its text with `{name}` placeholders."""

    id: str
    text: str

    def format(self, **values: str) -> str:
        # Placeholders were checked at load time to be plain names, so format_map cannot reach
        # attributes or items of the values.
        return self.text.format_map(values)


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """What every text of one template group must contain (checked by `load_templates`)."""

    placeholders: frozenset[str]
    segs: int = 0  # number of <SEG> in the text
    spans: int = 0  # number of literal <p>...</p> in the text (placeholder values add their own)


def _spec(*names: str, segs: int = 0, spans: int = 0) -> GroupSpec:
    return GroupSpec(frozenset(names), segs, spans)


_ANSWER = _spec(segs=1)
# task -> group -> spec: the structure a templates file must have, no more and no less.
TEMPLATE_GROUPS: dict[str, dict[str, GroupSpec]] = {
    "chat": {},
    "genseg": {"questions": _spec("categories"), "answers": _ANSWER},
    "ovseg": {"questions": _spec("categories"), "answers": _ANSWER},
    "refseg": {
        "questions": _spec("phrase", spans=1),
        "answers": _ANSWER,
        "grefseg_no_target": _ANSWER,
    },
    "reaseg": {
        "questions": _spec("phrase", spans=1),
        "questions_sentence": _spec("phrase", spans=1),
        "questions_explain": _spec("phrase", spans=1),
        "answers": _ANSWER,
        "answers_explain": _spec("explanation", segs=1),
    },
    "gcgseg": {"questions": _spec(), "answers": _spec("caption", segs=1)},
    "intseg": {"questions": _spec("regions"), "answers": _ANSWER},
    "vgdseg": {"questions": _spec("regions"), "answers": _ANSWER},
}


@dataclass(frozen=True)
class Templates:
    """A validated templates file. `sha256` is the hash of the file's bytes (record it with runs)."""

    version: str
    sha256: str
    source: str
    groups: Mapping[str, Mapping[str, tuple[Template, ...]]]

    def group(self, task: str, name: str) -> tuple[Template, ...]:
        """The variants of `task.name`; index 0 is the evaluation template."""
        try:
            return self.groups[task][name]
        except KeyError:
            raise KeyError(f"templates {self.source} have no group {task}.{name}") from None


def load_templates(path: str | Path | None = None) -> Templates:
    """Load and validate a templates file (None: the packaged `xsam/data/templates.yaml`).

    Parsed once per file content and process (a conversion renders every record with it).
    """
    if path is None:
        ref = resources.files("xsam.data").joinpath("templates.yaml")
        data, source = ref.read_bytes(), str(ref)
    else:
        data, source = Path(path).read_bytes(), str(path)
    return _templates_from_bytes(data, source)


@functools.lru_cache(maxsize=8)
def _templates_from_bytes(data: bytes, source: str) -> Templates:
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise TemplateError(f"templates file {source}: not valid YAML: {exc}") from exc
    return _parse_templates(doc, source, hashlib.sha256(data).hexdigest())


def _parse_templates(doc: Any, source: str, sha256: str) -> Templates:
    def fail(key: str, why: str) -> TemplateError:
        return TemplateError(f"templates file {source}: key {key!r}: {why}")

    if not isinstance(doc, dict):
        raise fail("(top)", "expected a mapping with keys 'version' and 'tasks'")
    if set(doc) != {"version", "tasks"}:
        raise fail("(top)", f"expected exactly the keys ['tasks', 'version'], got {sorted(map(str, doc))}")
    version = doc["version"]
    if not isinstance(version, (str, int)) or isinstance(version, bool) or str(version) == "":
        raise fail("version", "expected a non-empty string such as '1.0.0'")
    tasks = doc["tasks"]
    if not isinstance(tasks, dict):
        raise fail("tasks", "expected a mapping task -> groups")
    if set(tasks) != set(TEMPLATE_GROUPS):
        missing, extra = set(TEMPLATE_GROUPS) - set(tasks), set(tasks) - set(TEMPLATE_GROUPS)
        raise fail("tasks", f"missing tasks {sorted(missing)}, unknown tasks {sorted(map(str, extra))}")

    seen_ids: set[str] = set()
    groups: dict[str, dict[str, tuple[Template, ...]]] = {}
    for task, specs in TEMPLATE_GROUPS.items():
        raw = tasks[task] if tasks[task] is not None else {}
        if not isinstance(raw, dict):
            raise fail(f"tasks.{task}", "expected a mapping group -> list of {id, text}")
        if set(raw) != set(specs):
            raise fail(f"tasks.{task}", f"expected groups {sorted(specs)}, got {sorted(map(str, raw))}")
        groups[task] = {}
        for name, spec in specs.items():
            key = f"tasks.{task}.{name}"
            entries = raw[name]
            if not isinstance(entries, list) or not entries:
                raise fail(key, "expected a non-empty list of {id, text}")
            parsed = []
            for i, entry in enumerate(entries):
                ekey = f"{key}[{i}]"
                if not isinstance(entry, dict) or set(entry) != {"id", "text"}:
                    raise fail(ekey, "expected a mapping with exactly the keys 'id' and 'text'")
                tid, text = entry["id"], entry["text"]
                if not isinstance(tid, str) or not re.fullmatch(rf"{task}\.[a-z0-9_.]+", tid):
                    raise fail(f"{ekey}.id", f"id {tid!r} must be a string '{task}.<name>' ([a-z0-9_.])")
                if tid in seen_ids:
                    raise fail(f"{ekey}.id", f"duplicate id {tid!r} (ids must be unique and stable)")
                seen_ids.add(tid)
                if not isinstance(text, str) or not text.strip():
                    raise fail(f"{ekey}.text", "expected a non-empty string")
                try:
                    _check_template_text(text, spec)
                except ValueError as exc:
                    raise fail(f"{ekey}.text", f"{exc} (text: {text!r})") from None
                parsed.append(Template(id=tid, text=text))
            groups[task][name] = tuple(parsed)
    return Templates(version=str(version), sha256=sha256, source=source, groups=groups)


def _check_template_text(text: str, spec: GroupSpec) -> None:
    names: set[str] = set()
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as exc:  # unbalanced braces
        hint = "write literal braces as '{{' and '}}'"
        raise ValueError(f"bad placeholder syntax: {exc}; {hint}") from None
    for _literal, name, fmt, conversion in fields:
        if name is None:
            continue
        if not name.isidentifier() or fmt or conversion:
            raise ValueError(f"placeholder {{{name}}} must be a plain name without format spec or conversion")
        names.add(name)
    if names != spec.placeholders:
        want = ", ".join(f"{{{n}}}" for n in sorted(spec.placeholders)) or "none"
        got = ", ".join(f"{{{n}}}" for n in sorted(names)) or "none"
        raise ValueError(f"placeholders must be exactly {want}, got {got}")
    # Count markup with the placeholders emptied: their values bring their own markup.
    literal = text.format_map({n: "" for n in names})
    if literal.count(SEG_TOKEN) != spec.segs:
        raise ValueError(f"must contain exactly {spec.segs} {SEG_TOKEN}")
    n_p = literal.count(PHRASE_START)
    if n_p != spec.spans or literal.count(PHRASE_END) != spec.spans:
        raise ValueError(f"must contain exactly {spec.spans} {PHRASE_START}...{PHRASE_END} span(s)")
    if spec.spans and "<p>{phrase}</p>" not in text:
        raise ValueError("the phrase span must be written '<p>{phrase}</p>'")
    for token in (IMAGE_TOKEN, REGION_TOKEN):
        if token in literal:
            raise ValueError(f"must not contain {token} (the renderer places it)")


# ---------------------------------------------------------------------------------------- options


@dataclass(kw_only=True, frozen=True)
class RenderOptions:
    """How to render. Defaults follow the paper branch AAAI26_Archive (spec §8).

    Args:
        image_newline: paper branch: `<image>` then "\\n" then the question (the released weights saw
            the newline); `main`: `<image>` directly followed by the question.
        genseg_vocabulary: genseg/ovseg training vocabulary. "full" (paper): every category of the
            vocabulary, shuffled per (seed, key, epoch, item). "sampled" (`main`): the positive
            categories plus U(0, genseg_num_class - |positives|) random negatives, shuffled.
            Evaluation always lists the full vocabulary in id order (spec §1.4).
        genseg_num_class: `num_class` of the "sampled" vocabulary (128 on `main`).
        mode: "train" or "eval" items; "auto" decides per record from `record.source.split`
            (names starting with "train" render training items).
        vgd_negatives: paper branch: vgdseg training items get up to 5 negative regions half the
            time, whose features the loader takes from another sample of the micro-batch. A loader
            whose micro-batches hold one item has no other sample and renders without them.
    """

    image_newline: bool = True
    genseg_vocabulary: Literal["full", "sampled"] = "full"
    genseg_num_class: int = 128
    mode: Literal["train", "eval", "auto"] = "auto"
    vgd_negatives: bool = True

    def __post_init__(self) -> None:
        if self.genseg_vocabulary not in ("full", "sampled"):
            raise ValueError(f"genseg_vocabulary must be 'full' or 'sampled', got {self.genseg_vocabulary!r}")
        if self.mode not in ("train", "eval", "auto"):
            raise ValueError(f"mode must be 'train', 'eval' or 'auto', got {self.mode!r}")
        if self.genseg_num_class < 1:
            raise ValueError(f"genseg_num_class must be >= 1, got {self.genseg_num_class}")

    @classmethod
    def main_branch(cls, **overrides: Any) -> RenderOptions:
        """X-SAM `main`'s behaviour: no newline after `<image>`, sampled genseg vocabulary."""
        return cls(**{"image_newline": False, "genseg_vocabulary": "sampled", **overrides})


@dataclass(frozen=True, kw_only=True, slots=True)
class Category:
    """One entry of a dataset's category table (genseg/ovseg vocabulary)."""

    id: int
    name: str
    isthing: bool


def vocabulary_from_table(categories: Sequence[Mapping[str, Any]]) -> list[Category]:
    """A dataset's category table (`dataset.json` "categories": id, name, isthing) as the genseg/ovseg
    vocabulary `render_record` takes; `isthing` defaults to True."""
    return [Category(id=c["id"], name=c["name"], isthing=bool(c.get("isthing", True))) for c in categories]


def rng_for(seed: int, key: str, epoch: int, index: int) -> random.Random:
    """The random source of item `index` of record `key` at `epoch`: a pure function of the four.

    sha256 rather than `hash()`, whose str hashing is salted per process (PYTHONHASHSEED), and a
    private `Random` rather than the global one, which any library may reseed (spec §7 pitfall 11).
    """
    payload = json.dumps([int(seed), str(key), int(epoch), int(index)], separators=(",", ":"))
    return random.Random(int.from_bytes(hashlib.sha256(payload.encode("utf-8")).digest(), "big"))


def resolve_mode(record: Record, options: RenderOptions) -> Mode:
    """The mode `render_record` uses for `record` under `options`."""
    if options.mode != "auto":
        return options.mode
    return "train" if record.source.split.lower().startswith("train") else "eval"


_NAME_SUFFIXES = ("-merged", "-other", "-stuff")


@functools.lru_cache(maxsize=4096)
def _category_span(category_id: int) -> Span:
    """The (immutable in practice, shared) span of a genseg/ovseg category in the question turn:
    a record lists the whole vocabulary (133 spans), so they are built once per process."""
    return Span(turn=0, category_id=category_id)


@functools.lru_cache(maxsize=4096)
def _category_phrase(name: str) -> str | None:
    """`<p>{clean_category_name(name)}</p>`, the category's span in a genseg/ovseg question; None
    when the cleaned name holds a reserved string (`_Ctx.plain` rejects it). Cached: a record lists
    the whole vocabulary (133 names), so each name is cleaned and checked once per process."""
    text = clean_category_name(name)
    if any(token in text for token in _SPECIAL):
        return None
    return f"<p>{text}</p>"


_ID = operator.attrgetter("id")
def _seg_target(segment: int, span: int) -> SegTarget:
    """`SegTarget(segment=segment, span=span)` without the validation pass, for the genseg answer,
    whose indices come from `enumerate`/`range` (exact ints >= 0, what validation would store)."""
    return checked_model(SegTarget, {"segment": segment, "span": span})


@functools.lru_cache(maxsize=4096)
def clean_category_name(name: str) -> str:
    """A category name as genseg/ovseg prompts show it (`tag_categories`, spec §1.3).

    COCO: remove "-merged", "-other", "-stuff", replace "-" by a space, lowercase
    ("wall-other-merged" -> "wall", "floor-wood" -> "floor wood"). ADE20K names list synonyms
    ("building;edifice", "building, edifice"): we keep the text before the first ';' or ',', the
    primary name, because a prompt of all synonyms would add ~3x tokens and split one class over
    several words.
    """
    text = re.split(r"[;,]", name, maxsplit=1)[0].lower()
    for suffix in _NAME_SUFFIXES:
        text = text.replace(suffix, "")
    return " ".join(text.replace("-", " ").split())


# -------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Ctx:
    record: Record
    seed: int
    epoch: int
    templates: Templates
    options: RenderOptions
    mode: Mode

    def rng(self, index: int) -> random.Random:
        return rng_for(self.seed, self.record.key, self.epoch, index)

    def pick(self, rng: random.Random | None, group: str) -> Template:
        """Template 0 in evaluation (rng None), else a uniform choice."""
        variants = self.templates.group(self.record.task, group)
        return variants[0] if rng is None else rng.choice(variants)

    def error(self, why: str) -> ValueError:
        return ValueError(f"record {self.record.key} ({self.record.task}): {why}")

    def plain(self, text: str, what: str) -> str:
        for token in _SPECIAL:
            if token in text:
                raise self.error(f"{what} {text!r} contains the reserved string {token}")
        return text

    def item(
        self,
        index: int,
        turns: list[Turn],
        spans: Sequence[Span] = (),
        segs: Sequence[SegAnswer] = (),
        template_ids: Sequence[str] = (),
    ) -> Item:
        first_user = next((i for i, t in enumerate(turns) if t.role == "user"), None)
        if first_user is None:
            raise self.error("an item needs a user turn to hold the image")
        turns = list(turns)
        if self.record.image is not None:  # a text-only chat record has no <image>
            prefix = IMAGE_TOKEN + ("\n" if self.options.image_newline else "")
            turns[first_user] = Turn(role="user", text=prefix + turns[first_user].text)
        return Item(
            key=item_key(self.record.key, index),
            record_key=self.record.key,
            task=self.record.task,
            mode=self.mode,
            seed=self.seed,
            epoch=self.epoch,
            index=index,
            turns=turns,
            spans=list(spans),
            segs=list(segs),
            template_ids=list(template_ids),
        )


def render_record(
    record: Record,
    *,
    seed: int,
    epoch: int,
    templates: Templates,
    options: RenderOptions = RenderOptions(),
    vocabulary: list[Category] | None = None,
) -> list[Item]:
    """All items of `record` (item i has key `KEY#i`), rendered for (seed, epoch).

    `vocabulary` is the dataset's category table, used by genseg/ovseg (ignored by other tasks);
    None uses the categories of the record's own segments.
    """
    ctx = _Ctx(record, seed, epoch, templates, options, resolve_mode(record, options))
    return _RENDERERS[record.task](ctx, vocabulary)


def _render_chat(ctx: _Ctx, vocabulary: list[Category] | None) -> list[Item]:
    """LLaVA conversation as given; any `<image>` is removed and re-placed first (spec §1.3)."""
    if not ctx.record.conversations:
        raise ctx.error("a chat record needs conversations")
    turns = []
    for i, turn in enumerate(ctx.record.conversations):
        text = turn.value
        if IMAGE_TOKEN in text:
            # LLaVA writes "<image>\nQuestion" or "Question\n<image>": drop the token and its newline.
            text = text.replace(IMAGE_TOKEN, "").strip()
        ctx.plain(text, f"conversation turn {i}")
        turns.append(Turn(role="user" if turn.from_ == "human" else "assistant", text=text))
    return [ctx.item(0, turns)]


def _record_vocabulary(ctx: _Ctx) -> list[Category]:
    cats: dict[int, Category] = {}
    for seg in ctx.record.segments:
        if seg.category_id is None or seg.category_name is None:
            raise ctx.error(f"segment {seg.id} has no category; pass the dataset's vocabulary")
        cat = Category(id=seg.category_id, name=seg.category_name, isthing=bool(seg.isthing))
        if cats.setdefault(cat.id, cat).name != cat.name:
            raise ctx.error(f"category {cat.id} is named both {cats[cat.id].name!r} and {cat.name!r}")
    return list(cats.values())


def _render_genseg(ctx: _Ctx, vocabulary: list[Category] | None) -> list[Item]:
    """genseg/ovseg: one item, one turn; the question lists the vocabulary, one span per category.

    The one `<SEG>` answers every non-crowd segment, classified as its category's span. Crowd
    segments are not targets (they are regions to ignore, as in Mask2Former's COCO mapper).
    Training: full vocabulary shuffled (paper) or positives + random negatives (`main`), drawn per
    epoch (spec §7 pitfall 3). Evaluation: full vocabulary in id order, template 0.
    """
    vocab = sorted(vocabulary if vocabulary is not None else _record_vocabulary(ctx), key=_ID)
    if not vocab:
        raise ctx.error("empty category vocabulary")
    vocab_ids = set(map(_ID, vocab))
    if len(vocab_ids) != len(vocab):
        raise ctx.error("the vocabulary repeats a category id")
    targets = [(i, s) for i, s in enumerate(ctx.record.segments) if not s.iscrowd]
    for _, seg in targets:
        if seg.category_id not in vocab_ids:
            raise ctx.error(f"segment {seg.id}: category {seg.category_id} is not in the vocabulary")

    rng = ctx.rng(0) if ctx.mode == "train" else None
    if rng is None:
        cats = vocab
    elif ctx.options.genseg_vocabulary == "full":
        cats = list(vocab)
        rng.shuffle(cats)
    else:
        positive_ids = {s.category_id for _, s in targets}
        positives = [c for c in vocab if c.id in positive_ids]
        negatives = [c for c in vocab if c.id not in positive_ids]
        n_neg = min(rng.randint(0, max(0, ctx.options.genseg_num_class - len(positives))), len(negatives))
        cats = positives + rng.sample(negatives, n_neg)
        rng.shuffle(cats)

    question, answer = ctx.pick(rng, "questions"), ctx.pick(rng, "answers")
    phrases = [_category_phrase(c.name) for c in cats]
    if None in phrases:  # a name holding a reserved string: ctx.plain raises with its message
        for c, phrase in zip(cats, phrases):
            if phrase is None:
                ctx.plain(clean_category_name(c.name), f"category {c.id} name")
    cat_ids = list(map(_ID, cats))
    span_of = dict(zip(cat_ids, range(len(cats))))
    turns = [
        Turn(role="user", text=question.format(categories=", ".join(phrases))),
        Turn(role="assistant", text=answer.format()),
    ]
    seg = SegAnswer(turn=1, targets=[_seg_target(i, span_of[s.category_id]) for i, s in targets])
    spans = list(map(_category_span, cat_ids))
    return [ctx.item(0, turns, spans, [seg], [question.id, answer.id])]


def _phrase_segments(ctx: _Ctx, *, default_all: bool = False) -> list[list[int]]:
    record = ctx.record
    raw = record.meta.get("phrase_segments")
    if raw is None and default_all:
        return [list(range(len(record.segments))) for _ in record.phrases]
    if not isinstance(raw, list) or len(raw) != len(record.phrases):
        raise ctx.error('meta["phrase_segments"] must be a list with one list of segment indices per phrase')
    out = []
    for p, segs in enumerate(raw):
        ok = isinstance(segs, list) and all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < len(record.segments) for s in segs
        )
        if not ok or len(set(segs)) != len(segs):
            why = "is not a list of distinct segment indices"
            raise ctx.error(f'meta["phrase_segments"][{p}] = {segs!r} {why}')
        out.append(sorted(segs))
    return out


def _aligned(ctx: _Ctx, name: str, default: Any, kind: type | tuple[type, ...]) -> list[Any]:
    """meta[name] as a list aligned with phrases (a scalar applies to all phrases)."""
    n = len(ctx.record.phrases)
    raw = ctx.record.meta.get(name, default)
    values = raw if isinstance(raw, list) else [raw] * n
    if len(values) != n or not all(isinstance(v, kind) for v in values):
        raise ctx.error(f'meta["{name}"] must be one value per phrase (or one for all): {raw!r}')
    return values


# One question/answer pair of an item: its two turns, its span and its <SEG> answer.
_QA = tuple[list[Turn], Span, SegAnswer]


def _qa_turn(
    ctx: _Ctx, k: int, phrase: int, question: Template, answer: Template, targets: list[int], **values: str
) -> _QA:
    """The k-th question/answer pair of a multi-turn item: span k in turn 2k, <SEG> in turn 2k+1."""
    text = ctx.plain(ctx.record.phrases[phrase], f"phrase {phrase}")
    turns = [
        Turn(role="user", text=question.format(phrase=text)),
        Turn(role="assistant", text=answer.format(**values)),
    ]
    seg = SegAnswer(turn=2 * k + 1, targets=[SegTarget(segment=s, span=k) for s in targets])
    return turns, Span(turn=2 * k, phrase_index=phrase), seg


def _multi_turn_item(ctx: _Ctx, index: int, parts: list[_QA], ids: list[str]) -> Item:
    turns = [t for part in parts for t in part[0]]
    return ctx.item(index, turns, [p[1] for p in parts], [p[2] for p in parts], ids)


def _render_refseg(ctx: _Ctx, vocabulary: list[Category] | None) -> list[Item]:
    """refseg: phrases are expressions; `meta["phrase_segments"]` says what each refers to.

    Train (paper branch, spec §8): ONE item holding every referred object of the image, one turn
    per object, objects in random order, for each object one of its sentences at random. An
    "object" is a distinct target set, so the no-target expressions of a gRefCOCO image form one
    group of their own, answered with `grefseg_no_target`. The archive builds up to Σ#sentences
    sentence combinations per image; we draw one combination per epoch instead (a mixture wanting the
    archive's weight can repeat the record Σ#sentences times).
    Eval: one item per phrase, one turn, template 0; a no-target phrase answers `grefseg_no_target`
    with an empty target list (kept, unlike upstream, so GRES N-acc/T-acc can be measured).
    """
    if not ctx.record.phrases:
        raise ctx.error("a refseg record needs phrases")
    phrase_segments = _phrase_segments(ctx)

    def answer(rng: random.Random | None, targets: list[int]) -> Template:
        return ctx.pick(rng, "answers" if targets else "grefseg_no_target")

    if ctx.mode == "eval":
        items = []
        for p, targets in enumerate(phrase_segments):
            q, a = ctx.pick(None, "questions"), answer(None, targets)
            items.append(_multi_turn_item(ctx, p, [_qa_turn(ctx, 0, p, q, a, targets)], [q.id, a.id]))
        return items

    rng = ctx.rng(0)
    objects: dict[tuple[int, ...], list[int]] = {}  # target set -> its phrases, in phrase order
    for p, targets in enumerate(phrase_segments):
        objects.setdefault(tuple(targets), []).append(p)
    order = list(objects.items())
    rng.shuffle(order)
    parts, ids = [], []
    for k, (targets, phrases) in enumerate(order):
        p = rng.choice(phrases)
        q, a = ctx.pick(rng, "questions"), answer(rng, list(targets))
        parts.append(_qa_turn(ctx, k, p, q, a, list(targets)))
        ids += [q.id, a.id]
    return [_multi_turn_item(ctx, 0, parts, ids)]


def _render_reaseg(ctx: _Ctx, vocabulary: list[Category] | None) -> list[Item]:
    """reaseg: train = ONE item with every query of the image as a turn (paper branch, spec §8),
    in random order, each explanatory with p = 0.5 when it has an explanation; eval = one item per
    query, template 0, never explanatory. Short vs long queries: `meta["is_sentence"]`.
    """
    if not ctx.record.phrases:
        raise ctx.error("a reaseg record needs phrases (queries)")
    phrase_segments = _phrase_segments(ctx, default_all=True)
    is_sentence = _aligned(ctx, "is_sentence", False, bool)
    explanations = _aligned(ctx, "explanations", None, (str, type(None)))

    def part(k: int, p: int, rng: random.Random | None) -> tuple[_QA, list[str]]:
        explanation = explanations[p]
        if rng is not None and explanation is not None and rng.random() < 0.5:
            q, a = ctx.pick(rng, "questions_explain"), ctx.pick(rng, "answers_explain")
            values = {"explanation": ctx.plain(explanation, f"explanation {p}")}
        else:
            q = ctx.pick(rng, "questions_sentence" if is_sentence[p] else "questions")
            a, values = ctx.pick(rng, "answers"), {}
        return _qa_turn(ctx, k, p, q, a, phrase_segments[p], **values), [q.id, a.id]

    if ctx.mode == "eval":
        items = []
        for p in range(len(ctx.record.phrases)):
            qa, ids = part(0, p, None)
            items.append(_multi_turn_item(ctx, p, [qa], ids))
        return items

    rng = ctx.rng(0)
    order = list(range(len(ctx.record.phrases)))
    rng.shuffle(order)
    parts, ids = [], []
    for k, p in enumerate(order):
        qa, qa_ids = part(k, p, rng)
        parts.append(qa)
        ids += qa_ids
    return [_multi_turn_item(ctx, 0, parts, ids)]


def _render_gcgseg(ctx: _Ctx, vocabulary: list[Category] | None) -> list[Item]:
    """gcgseg: the answer is captions[0] with each grounded span rewritten as `<p>span</p>`, then
    one `<SEG>` answering every phrase's segments, classified by the phrase's rank in the caption.

    The text follows X-SAM's `tag_caption` exactly (the released weights saw it): the caption ends
    with "." (added when missing), and every `</p>` is followed by a space, even where the caption
    already had one ("<p>two cats</p>  lie on ...").

    Evaluation upstream generates the caption (empty answer), but an item's `<SEG>` count must match
    its text, so evaluation renders the same item as training with template 0; the evaluator uses
    the question turn only and generates the rest.
    """
    record = ctx.record
    if not record.captions:
        raise ctx.error("a gcgseg record needs a caption")
    caption = ctx.plain(record.captions[0], "caption").rstrip()
    if not caption.endswith("."):
        caption += "."
    phrase_segments = _phrase_segments(ctx)
    char_spans = record.meta.get("phrase_char_spans")
    if not isinstance(char_spans, list) or len(char_spans) != len(record.phrases):
        raise ctx.error('meta["phrase_char_spans"] must hold one [start, end] per phrase')
    bounds: list[tuple[int, int, int]] = []
    for p, span in enumerate(char_spans):
        if not (isinstance(span, list | tuple) and len(span) == 2 and all(isinstance(v, int) for v in span)):
            raise ctx.error(f'meta["phrase_char_spans"][{p}] = {span!r} is not [start, end]')
        start, end = span
        if not 0 <= start < end <= len(caption):
            raise ctx.error(f"phrase {p}: char span {span} is outside the caption (length {len(caption)})")
        bounds.append((start, end, p))
    bounds.sort()
    pieces, cursor = [], 0
    for start, end, p in bounds:
        if start < cursor:
            raise ctx.error(f"phrase {p}: char span [{start}, {end}] overlaps the previous one")
        pieces += [caption[cursor:start], PHRASE_START, caption[start:end], PHRASE_END, " "]
        cursor = end
    grounded = ("".join(pieces) + caption[cursor:]).strip()

    rng = ctx.rng(0) if ctx.mode == "train" else None
    q, a = ctx.pick(rng, "questions"), ctx.pick(rng, "answers")
    turns = [Turn(role="user", text=q.format()), Turn(role="assistant", text=a.format(caption=grounded))]
    spans = [Span(turn=1, phrase_index=p) for _, _, p in bounds]
    targets = [SegTarget(segment=s, span=k) for k, (_, _, p) in enumerate(bounds) for s in phrase_segments[p]]
    return [ctx.item(0, turns, spans, [SegAnswer(turn=1, targets=targets)], [q.id, a.id])]


NUM_VGD_NEGATIVES = 5  # spec §8: VGD training adds U(0, 5) negative categories with p = 0.5


def _region_item(ctx: _Ctx, index: int, rng: random.Random | None, chosen: list[int | None]) -> Item:
    """One turn listing one `<p><region></p>` per chosen prompt (None: a negative region from
    another sample of the batch); a prompt's `segment_ids` are its targets, classified by its span."""
    record = ctx.record
    index_of = {s.id: i for i, s in enumerate(record.segments)}
    targets = []
    for k, j in enumerate(chosen):
        if j is None:
            continue
        for sid in record.visual_prompts[j].segment_ids:
            if sid not in index_of:
                raise ctx.error(f"visual prompt {j} points at segment id {sid}, which the record lacks")
            targets.append(SegTarget(segment=index_of[sid], span=k))
    q, a = ctx.pick(rng, "questions"), ctx.pick(rng, "answers")
    turns = [
        Turn(role="user", text=q.format(regions=", ".join(_REGION_SPAN for _ in chosen))),
        Turn(role="assistant", text=a.format()),
    ]
    spans = [Span(turn=0, prompt_index=j) for j in chosen]
    return ctx.item(index, turns, spans, [SegAnswer(turn=1, targets=targets)], [q.id, a.id])


def _render_regions(ctx: _Ctx, vocabulary: list[Category] | None) -> list[Item]:
    """intseg/vgdseg (spec §1.4, §8): `<p><region></p>` turns from the record's visual prompts.

    Prompts are grouped by what they point at: vgdseg by category (the prompt's `phrase_index`,
    else its target set), intseg by instance (its target set). A record stores every prompt kind
    of every group; the item uses ONE prompt per group:
    - vgdseg: one item per record, one region per category present; training draws the prompt
      of each category at random and shuffles the categories, evaluation takes each category's
      first prompt in record order (convert with `--flavor KIND` for a one-kind evaluation set).
      VGD's negative regions (paper branch: up to 5 categories whose `<region>` features come from
      other samples of the batch) need the batch, so the loader adds them, not this function;
    - intseg: training as vgdseg (one region per instance); evaluation is one item per instance
      with its first prompt (X-SAM: one instance, one `<region>`, one target mask per sample).
    """
    record = ctx.record
    if not record.visual_prompts:
        raise ctx.error(f"a {record.task} record needs visual prompts")
    groups: dict[object, list[int]] = {}
    for j, prompt in enumerate(record.visual_prompts):
        if record.task == "vgdseg" and prompt.phrase_index is not None:
            group: object = ("phrase", prompt.phrase_index)
        else:
            group = ("targets", tuple(sorted(prompt.segment_ids)))
        groups.setdefault(group, []).append(j)
    members = list(groups.values())  # in order of first appearance
    if ctx.mode == "train":
        rng = ctx.rng(0)
        chosen: list[int | None] = [rng.choice(m) for m in members]
        if record.task == "vgdseg" and ctx.options.vgd_negatives and rng.random() < 0.5:
            # paper branch: up to 5 negative regions, whose <region> features the loader takes from
            # another sample of the batch; here they are spans with no prompt and no target
            chosen += [None] * rng.randint(0, NUM_VGD_NEGATIVES)
        rng.shuffle(chosen)
        return [_region_item(ctx, 0, rng, chosen)]
    if record.task == "intseg":
        return [_region_item(ctx, i, None, [m[0]]) for i, m in enumerate(members)]
    return [_region_item(ctx, 0, None, [m[0] for m in members])]


def text_chars(items: Sequence[Item]) -> int:
    """Characters in the turns of a record's first item: the text-length proxy that the index
    stores and the loader's length grouping sorts by (tokens would need the LLM's tokenizer)."""
    return sum(len(turn.text) for turn in items[0].turns) if items else 0


_RENDERERS: dict[str, Callable[[_Ctx, list[Category] | None], list[Item]]] = {
    "chat": _render_chat,
    "genseg": _render_genseg,
    "ovseg": _render_genseg,
    "refseg": _render_refseg,
    "reaseg": _render_reaseg,
    "gcgseg": _render_gcgseg,
    "intseg": _render_regions,
    "vgdseg": _render_regions,
}
