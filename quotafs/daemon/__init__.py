"""The mount's server: the only package that imports pyfuse3."""
