"""hivegen: a GPU-sharing network for LLM inference."""

__version__ = "0.1.0"
