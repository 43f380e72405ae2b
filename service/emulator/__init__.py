"""A local, independent emulator of Intuit's OAuth 2.0 / OpenID endpoints and the QuickBooks
Online Accounting API (CompanyInfo, entities, query, batch, CDC, reports, upload).

It shares no code with the rest of `service`: it is a separate reading of Intuit's protocol,
so the broker's tests exercise the broker against Intuit's behaviour, not against itself.
"""

from .app import create_app
from .config import EmulatorSettings

__all__ = ["EmulatorSettings", "create_app"]
