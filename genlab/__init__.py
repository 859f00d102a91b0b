"""genlab: a config-driven experiment runner for generative image models."""

__version__ = "0.1.0"
