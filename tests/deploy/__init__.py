"""A rolling deploy: workers of this release and of the next one on one database."""
