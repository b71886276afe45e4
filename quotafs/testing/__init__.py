"""quotafs for pytest: the plugin (`quotafs.testing.plugin`, loaded by its pytest11 entry
point) and the names a user's suite may import: the plugin's `__all__`, kept there only."""

from quotafs.testing.plugin import *  # noqa: F403  (re-exports the plugin's __all__)
