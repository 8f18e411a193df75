"""Lightning callbacks that orchestrate calibration, the register search and validation."""
