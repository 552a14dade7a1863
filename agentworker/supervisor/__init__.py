"""The supervisor process: spawns, watches and restarts worker processes (see the Supervisor issue)."""
