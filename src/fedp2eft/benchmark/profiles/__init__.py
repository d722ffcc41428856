"""Shipped benchmark profiles (YAML)."""
