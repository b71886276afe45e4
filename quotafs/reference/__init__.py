"""Real kernel filesystems to compare quotafs with (loop-ext4)."""
