"""Connections: a tenant's link to one QuickBooks company, its modules, status and audit trail."""
