"""The prescription gateway: settings, database, the starlette app and the rxledger CLI."""
