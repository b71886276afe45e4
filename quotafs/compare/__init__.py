"""The writers and the runner of `quotafs compare`."""
