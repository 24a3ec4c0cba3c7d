"""rrto benchmarks: ``python -m benchmarks`` runs them all, ``python -m benchmarks.NAME`` one.

Timings are printed and written as JSON under ``benchmarks/results/``; they are never asserted.
"""
