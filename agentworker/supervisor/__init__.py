"""The supervisor process (``agentworker run``): spawns, watches and restarts worker processes.

Modules, in the order a reader needs them (operator docs: ``docs/supervisor.md``):

* :mod:`~agentworker.supervisor.runner`: wires the loop, the Redis observer and the HTTP port; signals;
* :mod:`~agentworker.supervisor.reconcile`: the one reconcile loop that starts, stops and replaces workers;
* :mod:`~agentworker.supervisor.slots`: pools and their numbered slots (current, incoming, retiring);
* :mod:`~agentworker.supervisor.process`: one worker process: spawn, signal, reap, heartbeat, memory;
* :mod:`~agentworker.supervisor.zygote`: the supervisor's end of the zygote that forks workers pre-imported
  (the zygote's own code is worker-side: :mod:`agentworker.pools.zygote_process`);
* :mod:`~agentworker.supervisor.backoff`: restart delays;
* :mod:`~agentworker.supervisor.reload`: the quota-file watch and what a new file changes;
* :mod:`~agentworker.supervisor.observer`: routing table, queue depths and tenant counts in Redis;
* :mod:`~agentworker.supervisor.report`: pool health, the /status document, the supervisor's metrics;
* :mod:`~agentworker.supervisor.metrics_archive`: keeps the workers' metric files bounded across restarts.

The supervisor never imports the job side (``tasks``, ``graphs``, ``tools``) nor the worker process
(``pools``): workers and the zygote are separate processes it starts by module name and talks to through
exit codes, pipes, heartbeat files and metric files (``tests/test_architecture.py`` holds it to that).
"""
