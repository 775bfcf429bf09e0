"""xsam.eval.gcg against pycocoevalcap / pycocotools called directly and GLaMM's rules written out by
hand. No real GCG ground truth is available here, so the samples are built from real COCO masks
(image 439180's panoptic segments, image 39769's polygons) with phrases and captions written for
them; the text model is a tiny random BERT saved in tmp_path."""

from __future__ import annotations

import contextlib
import functools
import io
import json

import numpy as np
import pytest
import torch
from conftest import CORPORA
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from transformers import BertConfig, BertModel, BertTokenizer

from xsam.eval import gcg
from xsam.eval.gcg import GcgSample, TextSimilarity, caption_scores, gcg_scores, mask_scores, recall, strip_markup

RLE_GT = CORPORA / "coco_instances/annotations/panoptic_coco_detection_format.json"
POLYGON_GT = CORPORA / "coco_instances_polygons/annotations/instances_val2017.json"

# (key, caption, [(phrase, COCO annotation ids whose union is the phrase's mask)])
GROUND_TRUTH = [
    (
        "439180",
        "People ride horses along a gravel path past two trucks, with trees, grass and the sky behind them.",
        [
            ("People", [18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]),
            ("horses", [34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44]),
            ("a gravel path", [46]),
            ("two trucks", [32, 33]),
            ("trees", [47]),
            ("grass", [49]),
            ("the sky", [48]),
        ],
    ),
    (
        "000000039769",
        "A cat and another cat sleep on a pink blanket on a couch, next to two remote controls.",
        [
            ("A cat", [2190839]),
            ("another cat", [2190842]),
            ("a pink blanket", [1612051]),
            ("a couch", [1605237]),
            ("two remote controls", [1108446, 1110067]),
        ],
    ),
    (
        "439180-rider",
        "A rider on a brown horse waits beside a white truck.",
        [("A rider", [21]), ("a brown horse", [43]), ("a white truck", [33])],
    ),
]
PARAPHRASES = {
    "439180": "Several people are riding horses on a dirt track, with trees, grass and sky in the background.",
    "439180-rider": "A man on a horse stands next to a truck.",
}
WORDS = sorted(
    {w.strip(".,").lower() for _, caption, _ in GROUND_TRUTH for w in caption.split()}
    | {w.strip(".,").lower() for text in PARAPHRASES.values() for w in text.split()}
)


@pytest.fixture(scope="module")
def coco_masks() -> dict[int, np.ndarray]:
    """Every annotation of both real COCO files as a bool mask, by annotation id."""
    masks = {}
    for ann in json.loads(RLE_GT.read_text())["annotations"]:
        masks[ann["id"]] = mask_utils.decode(ann["segmentation"]).astype(bool)
    poly = json.loads(POLYGON_GT.read_text())
    (image,) = poly["images"]
    for ann in poly["annotations"]:
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], image["height"], image["width"]))
        masks[ann["id"]] = mask_utils.decode(rle).astype(bool)
    return masks


def union(coco_masks, ids) -> np.ndarray:
    return np.logical_or.reduce([coco_masks[i] for i in ids])


def with_markup(caption: str, phrases: list[str]) -> str:
    """The caption as X-SAM writes it: each phrase in <p>...</p> followed by <SEG>."""
    for phrase in phrases:
        caption = caption.replace(phrase, f"<p>{phrase}</p> <SEG>", 1)
    return caption


def shift(mask: np.ndarray, dx: int) -> np.ndarray:
    out = np.zeros_like(mask)
    out[:, dx:] = mask[:, :-dx]
    return out


@pytest.fixture(scope="module")
def identical(coco_masks) -> list[GcgSample]:
    samples = []
    for key, caption, grounded in GROUND_TRUTH:
        phrases = [p for p, _ in grounded]
        masks = [union(coco_masks, ids) for _, ids in grounded]
        samples.append(
            GcgSample(
                key=key, gt_caption=caption, gt_phrases=phrases, gt_masks=masks,
                pred_caption=with_markup(caption, phrases), pred_phrases=list(phrases), pred_masks=list(masks),
            )
        )
    return samples


@pytest.fixture(scope="module")
def perturbed(identical) -> list[GcgSample]:
    """439180: "two trucks" dropped, the horses shifted 10 px, the caption paraphrased;
    39769: the first cat shifted 20 px and the predictions in another order;
    439180-rider: the rider's mask is every other person, the caption and two phrases paraphrased."""
    a, b, c = identical
    others = np.logical_and(a.gt_masks[0], np.logical_not(c.gt_masks[0]))  # every person but the rider
    a_keep = [i for i, p in enumerate(a.gt_phrases) if p != "two trucks"]
    a_masks = [shift(a.gt_masks[i], 10) if a.gt_phrases[i] == "horses" else a.gt_masks[i] for i in a_keep]
    a_phrases = ["Several people", "horses", "a dirt track", "trees", "grass", "sky"]
    b_order = [4, 2, 0, 3, 1]
    b_masks = [shift(b.gt_masks[i], 20) if i == 0 else b.gt_masks[i] for i in b_order]
    return [
        GcgSample(key=a.key, gt_caption=a.gt_caption, gt_phrases=a.gt_phrases, gt_masks=a.gt_masks,
                  pred_caption=PARAPHRASES[a.key], pred_phrases=a_phrases, pred_masks=a_masks),
        GcgSample(key=b.key, gt_caption=b.gt_caption, gt_phrases=b.gt_phrases, gt_masks=b.gt_masks,
                  pred_caption=b.pred_caption, pred_phrases=[b.gt_phrases[i] for i in b_order], pred_masks=b_masks),
        GcgSample(key=c.key, gt_caption=c.gt_caption, gt_phrases=c.gt_phrases, gt_masks=c.gt_masks,
                  pred_caption=PARAPHRASES[c.key], pred_phrases=["A man", "a horse", "a white truck"],
                  pred_masks=[others, c.gt_masks[1], c.gt_masks[2]]),
    ]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference_meteor():
    meteor = Meteor()
    yield meteor
    del meteor


# ---------- independent computations ----------

def reference_captions(samples, meteor) -> dict[str, float]:
    """pycocoevalcap as COCOEvalCap runs it, on the captions without markup."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({s.key: [{"caption": s.gt_caption}] for s in samples})
    res = tokenizer.tokenize({s.key: [{"caption": clean}] for s, clean in zip(samples, clean_captions(samples))})
    return {"METEOR": meteor.compute_score(gts, res)[0] * 100, "CIDEr": Cider().compute_score(gts, res)[0] * 100}


def clean_captions(samples) -> list[str]:
    out = []
    for s in samples:
        text = s.pred_caption
        for tag in ("<p>", "</p>", "<SEG>"):
            text = text.replace(tag, " ")
        out.append(" ".join(text.split()))
    return out


def reference_ap50(tmp_path, samples) -> float:
    """GLaMM's AP50: GT JSON with string image ids (its image names), one category, scores 1.0."""
    def rle(mask):
        r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode()}

    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
    preds = []
    for s in samples:
        h, w = s.gt_masks[0].shape
        gt["images"].append({"id": s.key, "height": h, "width": w})
        for m in s.gt_masks:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": s.key, "category_id": 1,
                                      "segmentation": rle(m), "area": int(m.sum()), "iscrowd": 0})
        for m in s.pred_masks:
            preds.append({"image_id": s.key, "category_id": 1, "segmentation": rle(m), "score": 1.0})
    path = tmp_path / "gcg_mask_gt.json"
    path.write_text(json.dumps(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(path))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(preds), "segm")
        coco_eval.params.catIds = [1]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats[1] * 100


def iou(a, b) -> float:
    u = np.logical_or(a, b).sum()
    return np.logical_and(a, b).sum() / u if u else 0.0


def greedy(scores: dict, rows: int, cols: int, accept) -> list:
    """Take the best remaining (row, col) pair, ties to the first in row-major order, while accept()
    says so; GLaMM's argmax-and-remove loops."""
    taken, used_r, used_c = [], set(), set()
    while True:
        left = [(v, r, c) for (r, c), v in scores.items() if r not in used_r and c not in used_c]
        if not left:
            return taken
        v, r, c = max(left, key=lambda t: (t[0], -t[1], -t[2]))
        if not accept(v, r, c):
            return taken
        taken.append((v, r, c))
        used_r.add(r)
        used_c.add(c)


def reference_miou(samples) -> float:
    per_image = []
    for s in samples:
        ious = {(i, j): iou(p, g) for i, p in enumerate(s.pred_masks) for j, g in enumerate(s.gt_masks)}
        pairs = greedy(ious, len(s.pred_masks), len(s.gt_masks), lambda v, r, c: v > 0)
        per_image.append(np.mean([v for v, _, _ in pairs]) if pairs else 0.0)
    return float(np.mean(per_image)) * 100


def reference_recall(samples, folder) -> float:
    tokenizer = BertTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()

    @functools.cache
    def embed(text):
        with torch.no_grad():
            return model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].mean(0).numpy()

    def cosine(x, y):
        ex, ey = embed(x), embed(y)
        return float(ex @ ey / np.linalg.norm(ex) / np.linalg.norm(ey))

    hits = total = 0
    for s in samples:
        total += len(s.gt_phrases)
        ious = {(g, p): iou(gm, pm) for g, gm in enumerate(s.gt_masks) for p, pm in enumerate(s.pred_masks)}
        pairs = greedy(ious, len(s.gt_masks), len(s.pred_masks),
                       lambda v, g, p: v >= 0.5 and cosine(s.gt_phrases[g], s.pred_phrases[p]) >= 0.5)
        hits += len(pairs)
    return hits / total * 100


# ---------- tests ----------

def test_strip_markup():
    assert strip_markup("<p> A cat </p> [SEG] sleeps on <p>a couch</p><SEG>.") == "A cat sleeps on a couch."


def test_masks_identical(identical):
    assert mask_scores(identical) == pytest.approx({"AP50": 100.0, "mIoU": 100.0})


def test_masks_perturbed(perturbed, tmp_path):
    got = mask_scores(perturbed)
    assert got["AP50"] == reference_ap50(tmp_path, perturbed)
    assert got["mIoU"] == pytest.approx(reference_miou(perturbed), rel=1e-12)
    assert 0 < got["mIoU"] < 100 and 0 < got["AP50"] < 100
    # GLaMM's mIoU leaves unmatched ground truth out: dropping a phrase-mask alone costs nothing
    a = perturbed[0]
    dropped_only = GcgSample(key="a", gt_caption="", gt_phrases=a.gt_phrases, gt_masks=a.gt_masks, pred_caption="",
                             pred_phrases=a.gt_phrases[:3], pred_masks=a.gt_masks[:3])
    assert mask_scores([dropped_only])["mIoU"] == pytest.approx(100.0)


def test_masks_use_given_scores(perturbed, tmp_path):
    """X-SAM passes segment scores; a low score on a miss ranks it last and raises AP50."""
    c = perturbed[2]
    scored = GcgSample(key=c.key, gt_caption=c.gt_caption, gt_phrases=c.gt_phrases, gt_masks=c.gt_masks,
                       pred_caption=c.pred_caption, pred_phrases=c.pred_phrases, pred_masks=c.pred_masks,
                       pred_scores=[0.1, 0.9, 0.8])
    assert mask_scores([scored])["AP50"] > mask_scores([c])["AP50"]


def test_text_similarity(tiny_bert):
    sim = TextSimilarity(tiny_bert)
    m = sim.similarity(["a cat", "two remote controls"], ["a cat", "a couch", "two remote controls"])
    assert m.shape == (2, 3)
    assert m[0, 0] == pytest.approx(1.0) and m[1, 2] == pytest.approx(1.0)
    assert sim.similarity([], ["a cat"]).shape == (0, 1)


def test_recall(identical, perturbed, tiny_bert):
    sim = TextSimilarity(tiny_bert)
    assert recall(identical, sim) == pytest.approx(100.0)
    got = recall(perturbed, sim)
    assert got == pytest.approx(reference_recall(perturbed, tiny_bert), rel=1e-12)
    assert got < 100


class FixedSimilarity:
    """A stand-in text model: cosine 1 for equal phrases, else the given value."""

    def __init__(self, other: float = 0.0) -> None:
        self.other = other

    def similarity(self, a, b):
        return np.array([[1.0 if x == y else self.other for y in b] for x in a]).reshape(len(a), len(b))


def test_recall_rules(coco_masks):
    cat1, cat2 = coco_masks[2190839], coco_masks[2190842]
    near = shift(cat2, 20)  # IoU about 0.76 with cat2
    # the best-IoU pick fails the text threshold: GLaMM stops there, even though the second pair passes
    stop = GcgSample(key="stop", gt_caption="", gt_phrases=["a cat", "another cat"], gt_masks=[cat1, cat2],
                     pred_caption="", pred_phrases=["a dog", "another cat"], pred_masks=[cat1, near])
    assert recall([stop], FixedSimilarity()) == 0.0
    assert recall([stop], FixedSimilarity(other=0.6)) == 100.0
    # more masks than phrases: the best pick's mask has no phrase, GLaMM's IndexError loses the image
    unpaired = GcgSample(key="unpaired", gt_caption="", gt_phrases=["a cat", "another cat"], gt_masks=[cat1, cat2],
                         pred_caption="", pred_phrases=["another cat"], pred_masks=[near, cat1])
    assert recall([unpaired], FixedSimilarity(other=1.0)) == 0.0
    # counted over ground-truth phrases of all samples
    full = GcgSample(key="full", gt_caption="", gt_phrases=["a cat"], gt_masks=[cat1], pred_caption="",
                     pred_phrases=["a cat"], pred_masks=[cat1])
    assert recall([unpaired, full], FixedSimilarity()) == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="thresholds must lie in"):
        recall([full], FixedSimilarity(), iou_threshold=0.0)


def test_text_model_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model folder at .*nowhere.*bert-base-uncased.*text_model"):
        TextSimilarity(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no config.json.*huggingface-cli download"):
        TextSimilarity(tmp_path / "empty")


def test_java_missing(identical, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"METEOR needs a Java runtime: install one \(e\.g\. `apt-get install "
                                           r"default-jre-headless`, which `make system-deps` does\)"):
        caption_scores(identical)


def test_sample_validation(coco_masks):
    cat = coco_masks[2190839]
    with pytest.raises(ValueError, match=r"GcgSample 'k': 1 ground-truth phrases but 2 masks"):
        GcgSample(key="k", gt_caption="", gt_phrases=["a"], gt_masks=[cat, cat], pred_caption="",
                  pred_phrases=[], pred_masks=[])
    with pytest.raises(ValueError, match=r"GcgSample 'k': masks of different sizes"):
        GcgSample(key="k", gt_caption="", gt_phrases=["a"], gt_masks=[cat], pred_caption="",
                  pred_phrases=["a"], pred_masks=[coco_masks[18]])
    with pytest.raises(ValueError, match=r"GcgSample 'k': pred_masks\[0\] has dtype float32; binarise it"):
        GcgSample(key="k", gt_caption="", gt_phrases=["a"], gt_masks=[cat], pred_caption="",
                  pred_phrases=["a"], pred_masks=[cat.astype(np.float32)])
    sample = GcgSample(key="k", gt_caption="", gt_phrases=["a"], gt_masks=[cat], pred_caption="",
                       pred_phrases=["a"], pred_masks=[cat.astype(np.uint8)])
    with pytest.raises(ValueError, match=r"sample key 'k' appears twice"):
        mask_scores([sample, sample])


@pytest.mark.slow  # starts METEOR's Java twice (ours and the reference's): ~30 s on 2 cores
def test_captions_match_pycocoevalcap(identical, perturbed, reference_meteor):
    for samples in (identical, perturbed):
        got = caption_scores(samples)
        assert set(got) == {"METEOR", "CIDEr"}
        assert got == reference_captions(samples, reference_meteor)
    assert caption_scores(perturbed)["METEOR"] < caption_scores(identical)["METEOR"]


@pytest.mark.slow  # METEOR's Java start when run alone
def test_gcg_scores(identical, tiny_bert):
    without = gcg_scores(identical, text_model=None)
    assert set(without) == {"METEOR", "CIDEr", "AP50", "mIoU"}  # no recall without a text model
    full = gcg_scores(identical, text_model=tiny_bert)
    assert full == pytest.approx(dict(without, recall=100.0))
    gcg.stop_meteor()
    gcg.stop_meteor()  # stopping twice is harmless
