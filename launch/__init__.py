"""What starts runs: sweep configurations and benchmark scripts."""
