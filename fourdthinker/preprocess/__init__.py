"""Preprocessing: camera-motion labels, object-motion labels, QA options and chain-of-thought writers."""
