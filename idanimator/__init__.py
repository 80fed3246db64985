"""idanimator: zero-shot identity-preserving human video generation (ID-Animator) on diffusers."""

__version__ = "0.1.0"
