"""integrations layer (see DESIGN.md §1)."""
