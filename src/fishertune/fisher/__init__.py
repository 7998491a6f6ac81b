"""fishertune.fisher (see its issue); the core never imports recsys."""
