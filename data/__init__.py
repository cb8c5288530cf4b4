"""Data: the built-in brain phantom (phantom.py) and where the real data sets live (README.md)."""
