"""The appliance: a private LLM for sites with no internet."""

__version__ = "0.1.0"
