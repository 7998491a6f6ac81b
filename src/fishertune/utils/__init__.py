"""Small shared helpers: atomic writes, locks, progress bars, seeding, settings, foreach ops, denormals, read-back counts."""
