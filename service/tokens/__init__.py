"""Credential storage, encryption, refresh and keep-alive."""
