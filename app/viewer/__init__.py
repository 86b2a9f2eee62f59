"""Qt-free models of the workstation (layers, landmarks, runs, viewer state) and their storage.

Nothing here imports Qt, VTK or pyqtgraph (tests/test_engine_boundary.py checks it): the widgets
in :mod:`app.widgets` are views of these models.
"""
