"""Embedforge library: the pieces shared by the four command-line scripts."""
