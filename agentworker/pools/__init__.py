"""Worker processes: the only place that wires tasks, graphs and tools together (see pools/worker.py),
and the zygote that forks them pre-imported (pools/zygote_process.py)."""
