"""The broker's statements on its connection tables, in one place (service.store.connections)."""
