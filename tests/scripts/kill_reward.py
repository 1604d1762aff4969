"""tests/conftest.py's reward for `gmpo train --reward_funcs tests.scripts.kill_reward.count_ones_reward`, which can
kill the job the way the OOM killer does.

With GMPO_TEST_KILL_AT_CALL=N in the environment, rank 0 sends itself SIGKILL at its N-th call, i.e. while scoring its
N-th rollout (the launcher then stops the other rank); without it, this is count_ones_reward unchanged (same name, so
the same logged metric names).
"""

import os
import signal

from tests.conftest import count_ones_reward as _count_ones

_calls = 0


def count_ones_reward(completions, **kwargs):
    global _calls
    _calls += 1
    kill_at = os.environ.get("GMPO_TEST_KILL_AT_CALL")
    if kill_at and int(kill_at) == _calls and os.environ.get("RANK", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return _count_ones(completions, **kwargs)
