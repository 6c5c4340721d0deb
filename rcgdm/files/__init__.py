"""Run plumbing: atomic writes, locks, output checks, checkpoints, provenance (hashes, versions)."""
