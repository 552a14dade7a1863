"""Tenant-scoped tools (email, calendar, CRM) served to agents over MCP."""
