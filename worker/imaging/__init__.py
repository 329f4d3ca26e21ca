"""Imaging steps before a model: decoding DICOM pixel data into model-ready frames."""

from worker.imaging.decode import UndecodableImage, UnsupportedImage, decode_instance

__all__ = ["UndecodableImage", "UnsupportedImage", "decode_instance"]
