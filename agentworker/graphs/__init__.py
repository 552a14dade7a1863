"""LangGraph graphs: chat agent, workflow executor, tool agent."""
