"""Concept-erasure methods that produce ConceptGuard patches."""
