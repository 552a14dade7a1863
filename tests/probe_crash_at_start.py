"""A task module that makes the worker of some pools exit at start (loaded via AGENTWORKER_TASK_MODULES).

``PROBE_CRASH_POOLS=broken,other``: a worker started with ``--pool broken`` exits with code 3 while it
loads its tasks, the way a worker with a broken dependency or configuration would. Workers of other
pools are unaffected, so one test can show a failing pool next to healthy ones.
"""

from __future__ import annotations

import os
import sys

_pool = sys.argv[sys.argv.index("--pool") + 1] if "--pool" in sys.argv[:-1] else None
if _pool is not None and _pool in os.environ.get("PROBE_CRASH_POOLS", "").split(","):
    print(f"probe_crash_at_start: pool {_pool} is set to crash at start", file=sys.stderr)
    sys.exit(3)
