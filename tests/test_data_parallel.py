"""Worker pools of `data tokenize` / `data clean` end, even under a parent that catches or blocks SIGTERM.

A forked worker inherits the parent's Python signal handlers and mask; `ray.init` leaves its own
SIGTERM handler in the process, and a pool forked after it once hung the test suite on
Pool.terminate (workers that never die). Workers must take the default disposition.
"""

import subprocess
import sys

SCRIPT = """
import signal, sys
from lmforge.data.parallel import closing_pool, make_pool, ordered_map

def disposition(_):
    blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    return signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and not blocked

if __name__ == "__main__":
    if sys.argv[1] == "handler":  # a parent that turns SIGTERM into a flag, as ray.init or a training loop does
        signal.signal(signal.SIGTERM, lambda *a: None)
    else:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    with closing_pool(make_pool(2)) as pool:
        assert list(ordered_map(pool, abs, range(-5, 0), ahead=4)) == [5, 4, 3, 2, 1]
        assert all(ordered_map(pool, disposition, range(4), ahead=4))
    try:
        with closing_pool(make_pool(2)) as pool:  # an error mid-run: the pool is terminated (SIGTERM to workers)
            pool.apply_async(abs, (1,)).get()
            raise KeyError("stop")
    except KeyError:
        print("ok")
"""


def test_pools_end_under_a_parent_that_catches_or_blocks_sigterm():
    for mode in ("handler", "blocked"):
        cmd = [sys.executable, "-c", SCRIPT, mode]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
