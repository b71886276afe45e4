"""pyfuse3's examples/passthroughfs.py with an fsync handler: the issue's anchor
("pyfuse3 example + fsync handler").

The example as shipped has no fsync handler, so pyfuse3 answers ENOSYS, the kernel stops
sending FSYNC and every fsync(2) on the mount returns success without the data reaching
the backing disk. That makes it skip the work that native and quotafs do at the end of
every write workload. This wrapper loads the downloaded example unchanged and adds the
one handler, which syncs the file's descriptor (the example's file handle is the fd).

    python bench/pyfuse3_example.py EXAMPLE.py SOURCE MOUNTPOINT
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any


async def fsync(self: Any, fh: int, datasync: bool) -> None:
    if datasync:
        os.fdatasync(fh)
    else:
        os.fsync(fh)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: pyfuse3_example.py EXAMPLE.py SOURCE MOUNTPOINT")
    script = sys.argv.pop(1)
    spec = importlib.util.spec_from_file_location("passthroughfs", script)
    if spec is None or spec.loader is None:
        sys.exit(f"cannot load {script}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.Operations.fsync = fsync
    module.main()


if __name__ == "__main__":
    main()
