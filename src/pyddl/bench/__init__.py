"""Benchmarks: allreduce bandwidth against the link bound; training-step comparisons."""
