"""Web service."""
