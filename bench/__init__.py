"""Benchmarks of agentworker against plain ARQ (default and tuned) and SAQ: ``python -m bench`` or ``make bench``.

Everything runs in one invocation on one private ``redis-server`` the bench starts on a loopback port, so
the baselines share the machine's state of the moment: compare ratios, not absolute times. agentworker is
always driven as users drive it: the real supervisor (``agentworker run`` in a subprocess) and the real
client. ARQ and SAQ run their own worker CLIs in subprocesses. See the README's "Performance" section.
"""
