"""fishertune.tune (see its issue); the core never imports recsys."""
