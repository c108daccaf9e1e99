"""Adversarial inputs, by feature squeezing (Xu, Evans and Qi, NDSS 2018).

``squeeze``  the squeezers in numpy (bit depth, median, non-local means) and their typed spec ("median:2")
``graph``    FeatureSqueezingDetector: the squeezers and the served model fused into one ONNX graph
``watch``    AdversarialWatch: scores tapped traffic in micro-batches (shadow) or each request inline (flag/enforce)
"""
