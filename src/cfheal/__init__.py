"""cfheal: a self-healing controller for WebSocket services behind Cloudflare's connection limit."""

from .errors import CfhealError

__version__ = "0.1.0"
__all__ = ["CfhealError", "__version__"]
