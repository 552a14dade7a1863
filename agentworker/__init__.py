"""agentworker: the multi-tenant worker runtime for LangGraph agents and workflows on ARQ and Redis."""

__version__ = "0.1.0"
