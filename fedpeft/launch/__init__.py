"""Flower's own executables (SuperLink, SuperNode, flwr) as processes, and the one SuperLink handle
the simulation launcher and the deployment runner share. No flwr import: subprocesses only."""
