"""The Akida target: its declaration (``target.py``), rules and padding forms, devices and ``devices``
command, and the backend that emits and runs .fbz models through quantizeml, cnn2snn and akida."""
