"""The `quotafs` command: one module per command."""
