"""Outgoing webhooks over HTTP: endpoints, their deliveries, redelivery (the sender and the
events it carries are service.events')."""
