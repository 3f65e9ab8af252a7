"""regc runtime: load, run and benchmark compiled artifacts."""
