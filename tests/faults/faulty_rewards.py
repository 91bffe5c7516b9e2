"""A reward function that misbehaves on purpose, for the fault-injection runs.

Per completion (chosen by a hash of its text, so every run sees the same samples) it returns
NaN, raises, hangs or scores normally. Every misbehaving sample is scored 0 by
`rewards.on_error=zero`, so a run with it is still deterministic: the hang happens once per
process (a later hanging sample raises instead), and a timed-out sample scores what a raising
one does.
"""

import math
import time
import zlib

_hung = [False]
HANG_S = 120.0


def flaky(completions, **unused):
    text = completions[0]
    kind = zlib.crc32(text.encode()) % 7
    if kind == 0:
        return [math.nan]
    if kind == 1:
        raise RuntimeError("reward worker crashed (on purpose)")
    if kind == 2:
        if not _hung[0]:
            _hung[0] = True
            time.sleep(HANG_S)  # abandoned by the runner's timeout
        raise RuntimeError("reward worker crashed instead of hanging again (on purpose)")
    return [0.25 * (len(text) % 3)]
