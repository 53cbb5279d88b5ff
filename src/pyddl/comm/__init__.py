"""Collective algorithms, the background engine, tensor fusion and wire codecs."""
