"""The `fedpeft` command (entry point): simulate, deploy, report, privacy."""
