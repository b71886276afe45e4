"""The mount option flags, defined once for `mount` and `run`, and the MountOptions they
make: argparse gives strings, MountOptions.from_values checks them as it checks the API's
and the plugin's values, with the same messages."""

from __future__ import annotations

import argparse
from collections.abc import Collection
from typing import Any

from quotafs.options import OPTION_NAMES, MountOptions


def add_mount_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                      only: Collection[str] | None = None,
                      exclude: Collection[str] = ()) -> None:
    """The flags; each dest is the MountOptions field (--rules is read into `rules`).
    `only`: just the flags of these fields (sweep sets the limit and backing itself);
    `exclude`: not the flags of these (compare defines its own --limit)."""
    p = _Only(parser, only, exclude)
    p.add_argument("--limit", default=None,
                   help="quota in bytes: 120M, 1.5G, 10MB, 4096 (default: no limit)")
    p.add_argument("--backing", metavar="DIR",
                   help="existing directory to pass through; its content counts against the "
                        "limit (default: a private temporary directory)")
    p.add_argument("--keep-backing", action="store_true",
                   help="do not remove the private backing directory at unmount")
    p.add_argument("--accounting", default="blocks", metavar="{blocks,apparent}",
                   help="charge allocated blocks like ext4 (default) or apparent sizes")
    p.add_argument("--block-size", default=None,
                   help="accounting block size, reported by statfs (default 4096)")
    p.add_argument("--inodes", default=None,
                   help="inode limit: create/mkdir/... fail with ENOSPC past N inodes")
    p.add_argument("--reserve", metavar="PERCENT|SIZE", default=None,
                   help="keep the last PERCENT of the limit (5%%, as mkfs.ext4 does) or SIZE "
                        "for root, as ext4's reserved blocks: other users get ENOSPC and df "
                        "Avail there (default 0: every user gets the whole limit)")
    p.add_argument("--like-ext4", metavar="SIZE", default=None,
                   help="the limit, reserve, block size and inodes of a default mkfs.ext4 "
                        "of a SIZE image, measured (--limit/--reserve/--inodes override "
                        "them; see docs/semantics.md)")
    sigbus = p.group("mmap_sigbus")
    sigbus.add_argument("--mmap-sigbus", dest="mmap_sigbus", action="store_true",
                        help="ext4-faithful mmap: SIGBUS at the faulting write past the "
                             "quota (reserves quota for hole pages read through writable "
                             "handles; see docs/semantics.md)")
    sigbus.add_argument("--no-mmap-sigbus", dest="mmap_sigbus", action="store_false",
                        help="plain FUSE mmap semantics: ENOSPC at msync/fsync (default)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users access the mount (needs user_allow_other "
                        "in /etc/fuse.conf when not root)")
    p.add_argument("--no-cache", action="store_true",
                   help="no kernel caching (attributes, names, pages across opens, "
                        "raised read-ahead): use when other programs also write to the "
                        "backing directory")
    p.add_argument("--fsname", default="quotafs", help="source name shown by mount and df")
    p.add_argument("--rules", metavar="FILE", dest="rules_file",
                   help="load fault rules from a TOML file (see docs/faults.md)")
    p.add_argument("--seed", default=None,
                   help="seed of the fault rules' random choices (default: random, printed)")
    p.add_argument("--debug", action="store_true", help="log every FUSE request")
    p.add_argument("--xattrs", default=True, metavar="{on,off}",
                   help="extended attributes and ACLs (default on); off answers them "
                        "'Operation not supported', which spares a request before every "
                        "write (see docs/usage.md)")
    p.add_argument("--crash-sim", action="store_true",
                   help="record what is durable (fsync, fdatasync, fsyncdir), so that "
                        "`quotafs crash` can cut the power and lose the rest (see "
                        "docs/crash.md; default off: no cost)")


class _Only:
    """add_argument that skips the flags of fields not in `only` (None: every field)."""

    def __init__(self, parser: argparse.ArgumentParser | Any,
                 only: Collection[str] | None, exclude: Collection[str] = ()) -> None:
        self._parser = parser
        self._only = only
        self._exclude = exclude

    def _wanted(self, flags: tuple[str, ...], kwargs: dict[str, Any]) -> bool:
        dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
        return (self._only is None or dest in self._only) and dest not in self._exclude

    def add_argument(self, *flags: str, **kwargs: Any) -> None:
        if self._wanted(flags, kwargs):
            self._parser.add_argument(*flags, **kwargs)

    def group(self, dest: str) -> _Only:
        """A mutually exclusive group for the flags of one field."""
        if (self._only is not None and dest not in self._only) or dest in self._exclude:
            return _Only(self._parser, ())
        return _Only(self._parser.add_mutually_exclusive_group(), None)


def mount_options(args: argparse.Namespace) -> MountOptions:
    """The flags of add_mount_options as MountOptions, checked: no side effect but reading
    the --rules file."""
    return MountOptions.from_values({name: getattr(args, name) for name in OPTION_NAMES
                                     if hasattr(args, name)})
