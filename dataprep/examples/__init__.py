"""Small example inputs in each corpus's EXACT upstream format, derived from the real COCO samples.

No real RefCOCO, gRefCOCO, ReasonSeg, GCG, LLaVA, COCO-Interactive or VGD file can be shipped here,
so each module builds one from the bundled real COCO images and annotations (`examples/corpora/`),
and labels everything it writes as derived. `xsam data make-examples` runs them; tests and
`make quickstart` convert the results.
"""
