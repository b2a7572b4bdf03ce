"""Statistics, correlations and plots over alignment tables (pure functions of arrays)."""
