"""The quotafs benchmark suite: `python bench/run.py --help`."""
