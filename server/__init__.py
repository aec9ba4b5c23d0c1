"""The ConceptGuard LitServe server: HTTP API, tenants, per-worker patch runtime, metrics."""
