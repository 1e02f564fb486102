"""The benchmarks: one module (or package) each, named as registered in `calibft.eval.BENCHMARKS`.

A benchmark holds everything that is its own (items, scoring, parsers, metrics, plots, data
loading) and never imports another benchmark; code with two or more users lives in `calibft.eval`
(`text`, `figures`, `metrics`, `report`) or `calibft.eval.prompting`.
"""
