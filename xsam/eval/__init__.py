"""Evaluation: X-SAM's metrics and the scoring of prediction files against our shards (spec §5).

Metric modules are pure numpy (+ pycocotools / pycocoevalcap) accumulators, each written from its
reference implementation and tested against it:
- `panoptic`: PQ / SQ / RQ as panopticapi defines them (genseg, ovseg);
- `semantic`: mIoU from a confusion matrix, as detectron2's SemSegEvaluator (genseg, ovseg);
- `coco`: mask AP with pycocotools' COCOeval (genseg / ovseg instance, vgdseg, GCG's AP50);
- `referring`: cIoU / gIoU (refseg, reaseg, intseg per prompt type) and GRES N-acc / T-acc (gRefCOCO);
- `gcg`: GLaMM's grounded-caption protocol: METEOR, CIDEr, AP50, mIoU, phrase-mask recall.

`groundtruth` reads a task's ground truth out of a dataset folder's records, `predictions` reads the
prediction formats the references read, and `score` puts them together (`xsam eval score`).
Nothing here imports Ray, DeepSpeed or MLflow: the evaluation job (`jobs.evaluate`) does.
"""
