"""Speed measurements for layerpair-export: throughput (CPU), GPU decode, and export cost against anchors.

Not part of the installed package: run from the repository root, e.g. ``python -m benchmarks.throughput``.
"""
