"""runtime layer (see DESIGN.md §1)."""
