"""Run a command, then write its wall time and peak RSS to a file.

    python3 -S -I bench/measure.py OUT COMMAND [ARGS...]

bench/run.py starts every tool through this small launcher instead of
forking it directly: Linux carries a process's memory high-water mark across
exec, so a child forked from the benchmark's own Python (boto3 and psycopg2
loaded) would report that process's RSS as its own peak. Forked from this
launcher, the floor is only the launcher's few MiB (bench/run.py measures it
and reports it). os.wait4 gives the child's ru_maxrss, which covers the
child and the grandchildren it waited for.

OUT gets one line: "<seconds> <ru_maxrss KiB> <exit code> <user+system CPU seconds>". The launcher
exits with the command's exit code.
"""
import os
import sys
import time


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            os.write(2, f"measure.py: cannot run {argv[0]}: {exc}\n".encode())
        os._exit(127)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    with open(out, "w") as f:
        f.write(f"{seconds:.6f} {usage.ru_maxrss} {code} {cpu:.3f}\n")
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
