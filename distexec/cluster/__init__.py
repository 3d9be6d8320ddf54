"""cluster layer (see DESIGN.md §1)."""
