"""eval layer: base + few-shot vs fine-tuned — quality, prompt tokens, latency — and method comparison.

- :func:`tunesmith.eval.runner.evaluate`: every model answers every held-out case, measured alike.
- :func:`tunesmith.eval.report.write_report`: report.json, report.md and charts.
- :func:`tunesmith.eval.compare.compare`: train each method, evaluate, recommend one.
- :func:`tunesmith.eval.split.split_file`: deterministic, stratified train/held-out split.
- :mod:`tunesmith.eval.synthetic`: the generators of the demo and example datasets.
"""
