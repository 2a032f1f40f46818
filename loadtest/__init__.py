"""prefixserve loadtest package."""
