"""The utility sweep (docs/results.md): see ``__main__`` for usage."""
