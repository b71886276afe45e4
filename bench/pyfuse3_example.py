"""pyfuse3's examples/passthroughfs.py with an fsync handler: the issue's anchor
("pyfuse3 example + fsync handler").

The example as shipped has no fsync handler, so pyfuse3 answers ENOSYS, the kernel stops
sending FSYNC and every fsync(2) on the mount returns success without the data reaching
the backing disk. That makes it skip the work that native and quotafs do at the end of
every write workload. This wrapper loads the downloaded example unchanged and adds the
one handler, which syncs the file's descriptor (the example's file handle is the fd).

    python bench/pyfuse3_example.py EXAMPLE.py [--xattr] SOURCE MOUNTPOINT

The example has no xattr handlers either, so pyfuse3 answers getxattr with ENOSYS and the
kernel stops asking (the GETXATTR "security.capability" it otherwise sends before every
write(2)). With --xattr the wrapper adds the plainest getxattr a passthrough with extended
attributes has, getxattr(2) of the backing path: the least that a filesystem which stores
data and supports xattrs, as quotafs does by default, does per write.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import sys
from typing import Any

import pyfuse3


async def fsync(self: Any, fh: int, datasync: bool) -> None:
    if datasync:
        os.fdatasync(fh)
    else:
        os.fsync(fh)


async def getxattr(self: Any, inode: int, name: bytes, ctx: Any) -> bytes:
    try:
        return os.getxattr(self._inode_to_path(inode), name, follow_symlinks=False)
    except OSError as exc:  # ENODATA is pyfuse3.ENOATTR on Linux
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: pyfuse3_example.py EXAMPLE.py [--xattr] SOURCE MOUNTPOINT")
    script = sys.argv.pop(1)
    xattr = sys.argv[1:2] == ["--xattr"]
    if xattr:
        del sys.argv[1]
    spec = importlib.util.spec_from_file_location("passthroughfs", script)
    if spec is None or spec.loader is None:
        sys.exit(f"cannot load {script}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.Operations.fsync = fsync
    if xattr:
        module.Operations.getxattr = getxattr
    module.main()


if __name__ == "__main__":
    main()
