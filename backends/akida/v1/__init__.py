"""Akida IP v1 (AKD1000, AKD1500): ONNX lowered to tf_keras, quantized to 1-4 bits and converted under v1.

``lowering`` turns the legalized float ONNX graph into an equivalent tf_keras model; ``convert`` applies the
v1 recipe (quantizeml with low bit widths and cnn2snn, both inside ``cnn2snn.set_akida_version(v1)``);
``emit`` writes a bundle segment; ``rules`` is the v1 lint rule table. See docs/akida-v1.md.
"""
