"""`fedpeft report RUN_DIR`: a Markdown report with plots from any run directory."""
