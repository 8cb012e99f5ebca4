"""HTTP handlers for the Registry v2 / OCI distribution API."""
