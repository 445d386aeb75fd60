"""fedpeft."""
