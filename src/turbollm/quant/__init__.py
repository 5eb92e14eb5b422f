"""Reserved for a later stage (see DESIGN.md)."""
