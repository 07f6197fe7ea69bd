"""InstantStyle: style-block IP-Adapters for SDXL and SD 1.5 (library part: no training loop)."""

__version__ = "0.1.0"
