"""X-SAM (arXiv 2508.04655, "From Segment Anything to Any Segmentation").

`xsam.data` holds the one sample contract (record, item, rendering) that every other part of
xsam-pipeline reads and writes. Later: `xsam.model` (the network), losses, post-processing and
metrics. Nothing under `xsam` imports Ray, DeepSpeed or MLflow.
"""

__version__ = "0.1.0"
