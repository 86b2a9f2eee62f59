"""RegStation engine: headless registration, I/O and evaluation (no Qt, VTK or pyqtgraph)."""
