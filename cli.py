"""The `lcp` command line (placeholder; filled in below)."""
