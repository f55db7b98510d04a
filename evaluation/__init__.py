"""Task scorers and their golden cases."""
