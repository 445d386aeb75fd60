"""Deployment: certificates, SuperNode keys, and the ``coordinator`` / ``client`` commands.

``certs`` builds the TLS and SuperNode-authentication material with ``cryptography``;
``commands`` wraps Flower's own ``flower-superlink`` / ``flower-supernode`` / ``flwr`` entry
points; ``fedpeft.client.warm_app`` keeps one ClientApp process (and its base model) alive across rounds.
"""
