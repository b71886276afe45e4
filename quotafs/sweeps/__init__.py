"""`quotafs sweep`: the disk full at each point of a program's run; `plan` is the pure part
(points, verdicts, results), `runner` runs them on fresh mounts."""
