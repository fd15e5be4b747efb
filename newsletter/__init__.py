"""newsletter: Markdown digests rendered once into inline-styled email and delivered to a list."""

__version__ = "0.1.0"
