"""explab: a distributed experiment platform on Ray for explainable-ML research."""

__version__ = "0.1.0"
