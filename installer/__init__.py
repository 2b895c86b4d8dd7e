"""Install time: bundle format, hardware probe, tier planning, install steps, unit rendering."""
