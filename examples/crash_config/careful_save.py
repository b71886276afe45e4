"""Save version 2 of app.conf the careful way: write app.conf.tmp and fsync it (its data
durable), rename it over app.conf, fsync the directory (the rename durable), then log
"saved". Only then is "saved" true after any crash."""

from __future__ import annotations

import os

from settings import CONF, TEMP, fsync_path, log, version


def main() -> None:
    with open(TEMP, "wb") as f:
        f.write(version(2))
        f.flush()
        os.fsync(f.fileno())
    os.rename(TEMP, CONF)
    fsync_path(".", directory=True)
    log("saved version 2")
    print("saved")


if __name__ == "__main__":
    main()
