"""The TriFuse application: the ``trifuse`` command line and stage runners (kept thin)."""
