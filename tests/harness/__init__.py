"""Drives the real ComfyUI runtime for the tests and the headless example job."""
