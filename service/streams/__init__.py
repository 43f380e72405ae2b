"""Live event streams: server-sent events of the tenant's connection events, on every replica."""
