"""Save version 2 of app.conf the careless way: write app.conf.tmp, rename it over app.conf,
log "saved". Nothing makes the new file's data or the rename durable; the log's fsync
makes only the log's own data durable (and, on ext4, commits the rename in its journal:
a committed name whose data never reached the disk, the zero-length file)."""

from __future__ import annotations

import os

from settings import CONF, TEMP, log, version


def main() -> None:
    with open(TEMP, "wb") as f:
        f.write(version(2))
    os.rename(TEMP, CONF)
    log("saved version 2")
    print("saved")


if __name__ == "__main__":
    main()
