"""qbo-broker: cieTrade's OAuth 2.0 broker for QuickBooks Online."""
