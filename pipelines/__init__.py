"""Pipeline definitions wiring the components."""
