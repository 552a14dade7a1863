"""Worker processes: the only place that wires tasks, graphs and tools together (see pools/worker.py)."""
