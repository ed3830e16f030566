"""One pane per file."""
