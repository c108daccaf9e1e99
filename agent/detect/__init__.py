"""Detectors that watch a copy of the inference traffic: one small module per family.

``squeeze``     feature-squeezing squeezers in numpy, and their typed spec
``fused``       the squeezers and the served model fused into one ONNX graph
``calibration`` thresholds and reference statistics, set on benign data, in a JSON artifact
"""
