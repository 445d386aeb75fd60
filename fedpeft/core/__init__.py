"""Ground floor: typed errors, adapter tensors on the wire, the embedded models, protocol names."""
