"""Pieces shared by the coordination server and the department clients."""
