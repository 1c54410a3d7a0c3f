"""Runnable examples of deepport's ops put together (``python -m deepport.examples.<name>``)."""
