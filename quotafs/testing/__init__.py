"""quotafs for pytest: the plugin (`quotafs.testing.plugin`, loaded by its pytest11 entry
point) and the names a user's suite may import."""

from quotafs.testing.plugin import (
    DEFAULT_LIMIT,
    FORCE_NO_FUSE_ENV,
    FORCE_NO_LOOP_ENV,
    MARKER,
    OptionError,
    QuotafsFactory,
    QuotafsLeakWarning,
    ext4_unusable_reason,
    fuse_unusable_reason,
    mount_options,
)

__all__ = [
    "DEFAULT_LIMIT",
    "FORCE_NO_FUSE_ENV",
    "FORCE_NO_LOOP_ENV",
    "MARKER",
    "OptionError",
    "QuotafsFactory",
    "QuotafsLeakWarning",
    "ext4_unusable_reason",
    "fuse_unusable_reason",
    "mount_options",
]
