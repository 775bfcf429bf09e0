"""The X-SAM network (arXiv 2508.04655, spec /work/shared/xsam-spec.md §3): encoders' projectors,
the SAM-to-decoder connector, the `<region>` sampler, the Mask2Former-style decoder and its loss.

One module per part, plain torch + transformers; no Ray, DeepSpeed or MLflow. Weight loading,
freezing, LoRA and ZeRO wrapping are applied from outside (jobs/), not inside these modules.
"""
