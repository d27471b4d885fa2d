"""BraTS discovery, NIfTI I/O, label conventions, validation, cache and manifests."""
