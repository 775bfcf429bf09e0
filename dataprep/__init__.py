"""Corpus conversion: upstream segmentation corpora -> versioned WebDataset shards.

One converter per corpus (`dataprep.converters`) turns upstream records into `xsam.data.Record`s;
`dataprep.convert` plans and runs units of work, `dataprep.shard_writer` writes byte-reproducible
tar shards, `xsam.data.manifest` the parquet manifest/index/quarantine and `dataset.json`.
`dataprep` imports `xsam.data` (the schema) and nothing from `jobs` or `pipelines`; where the work
runs (local Ray or a cluster) is decided in `jobs.convert`.
"""
