"""A module that starts a thread when imported (named in AGENTWORKER_ZYGOTE_PRELOAD by tests/test_zygote.py):
a zygote that imported it must refuse to fork, since a forked worker would inherit a lock held by a
thread that no longer exists there."""

from __future__ import annotations

import threading

_never = threading.Event()
threading.Thread(target=_never.wait, name="zygote-unsafe-probe", daemon=True).start()
