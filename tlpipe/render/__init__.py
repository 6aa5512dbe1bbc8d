"""Rendering numbers, tables, figures and the HTML report (depends on core only)."""
