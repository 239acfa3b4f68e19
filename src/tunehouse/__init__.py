"""tunehouse: a self-hosted, OpenAI-compatible fine-tuning platform.

Importing this package must stay cheap: no torch, no transformers.
"""

__version__ = "0.1.0"
