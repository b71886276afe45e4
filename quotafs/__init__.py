"""quotafs: a FUSE passthrough that runs out of space where a real filesystem would."""

__version__ = "0.1.0"

from typing import Any

__all__ = ["Ext4Mount", "QuotaMount", "ext4_loop", "mounted", "open_quota_mount"]


def __getattr__(name: str) -> Any:
    # Lazy: `python -m quotafs.writers` and the size parser should not pay for pyfuse3.
    if name in __all__:
        from quotafs import api

        return getattr(api, name)
    raise AttributeError(f"module 'quotafs' has no attribute {name!r}")
