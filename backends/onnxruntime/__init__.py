"""The ONNX Runtime target: an int8 QDQ model for ONNX Runtime (``backend.py``), declared in ``target.py``."""
