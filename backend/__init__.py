"""Neural Atlas backend: Hashing Neural Video Decomposition as a library.

Rooms (one responsibility each, dependencies point downward):
clip -> preprocess -> encodings -> model -> losses -> train -> export/edit;
synthetic makes ground-truth clips; service is a thin ZeroMQ layer; cli wires.
"""

__version__ = "0.1.0"
