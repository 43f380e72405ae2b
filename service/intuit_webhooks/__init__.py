"""Intuit's webhooks in: `POST /intuit/webhooks` verifies and stores each notification, and a
background processor turns the entity changes in it into `quickbooks.entity_changed` events."""
