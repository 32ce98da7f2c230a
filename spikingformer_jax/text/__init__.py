"""Spikingformer for language: WordPiece tokenisation, GLUE / MLM data, and the text model."""
