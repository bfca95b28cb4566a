"""What starts runs: presets, sweep configurations and benchmark scripts."""
