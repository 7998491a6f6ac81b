"""fishertune.layers (see its issue); the core never imports recsys."""
