"""Deterministic simulator of whole dsnode clusters (plain synchronous code)."""
